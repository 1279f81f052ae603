"""LoRA adapters for the training stage (training.lora; docs/method.md, 'LoRA').

Each targeted linear layer W of every decoder layer gets two trainable matrices, A (rank x in)
and B (out x rank), and computes W x + (alpha / rank) * B A x; W stays frozen. B starts at
zero, so training starts from the model it was given, as full-weight training does.

peft injects the adapters in place (`inject_adapter_in_model`, not `get_peft_model`): the model
stays its own Hugging Face class with its own module paths, so the scorer, FSDP2's per-layer
sharding and the streamed export see the model they know. A wrapped layer's weight moves from
`<layer>.weight` to `<layer>.base_layer.weight`; its adapter is `<layer>.lora_A.default.weight`
and `<layer>.lora_B.default.weight`. The adapters are injected on the meta device before
sharding and filled after (`initial_adapters`), like the base weights, so no process ever holds
the whole model.

The paper trains every weight; the adapter changes what can be learnt (a rank-r update per
layer), so a LoRA run is not the paper's method, only a cheaper relative of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sami_operator.models import LoraSpec
from sami_worker.tasks import TaskError

ADAPTER = "default"  # peft's name for a model's one adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's saved adapters name tensors as the PeftModel wrapping the model sees them.
_PEFT_PREFIX = "base_model.model."


def lora_config(spec: LoraSpec, base_model: str | None = None):
    """The peft LoraConfig of training.lora (kaiming-uniform A, zero B: peft's default)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def add_adapters(model: nn.Module, spec: LoraSpec) -> None:
    """Inject adapters into `model` in place (on the meta device: no memory) and freeze every
    other parameter. Every name in targetModules must match a linear layer inside a decoder
    layer (TaskError otherwise: an adapter on nothing would train nothing)."""
    from peft import inject_adapter_in_model

    layer_types = tuple(getattr(model, "_no_split_modules", None) or ())
    layers = [n for n, m in model.named_modules() if type(m).__name__ in layer_types]
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name.startswith(f"{lay}.") for lay in layers)
    }
    missing = [t for t in spec.target_modules if t not in found]
    if missing:
        raise TaskError(
            f"training.lora.targetModules: {missing} match no linear layer inside the decoder "
            f"layers of {type(model).__name__}; valid here: {sorted(found)}"
        )
    inject_adapter_in_model(lora_config(spec), model, low_cpu_mem_usage=True)


def is_adapter(name: str) -> bool:
    """Whether a parameter name is an adapter's (A or B)."""
    return ".lora_A." in name or ".lora_B." in name


def checkpoint_name(name: str) -> str:
    """The Hugging Face checkpoint's name of a model parameter: a wrapped layer's base weight
    without `.base_layer`; other names unchanged."""
    return name.replace(".base_layer.", ".")


def initial_adapters(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Full float32 CPU tensors for every adapter parameter of `model` (sharded or on the meta
    device: only names and shapes are read): A kaiming-uniform as peft draws it (a = sqrt 5),
    B zero. Drawn from one generator seeded with `seed`, in parameter order, so every rank and
    every number of ranks gets the same adapters."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in model.named_parameters():
        if not is_adapter(name):
            continue
        tensor = torch.zeros(param.shape, dtype=torch.float32)
        if ".lora_A." in name:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        out[name] = tensor
    return out


def scalings(model: nn.Module) -> dict[str, float]:
    """alpha / rank per wrapped layer, by the layer's module path."""
    return {
        name: module.scaling[ADAPTER]
        for name, module in model.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and ADAPTER in module.scaling
    }


def merge_adapters(
    tensors: dict[str, torch.Tensor], scaling: dict[str, float], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One group of full tensors (a decoder layer's, say) with each adapter merged into its
    base weight, W' = W + scaling * B @ A, computed in float32 and cast to `dtype`, under the
    Hugging Face checkpoint's names; tensors of unwrapped layers are only cast. Meta tensors
    work too (names and shapes for planning a file).

    Shapes: W (out, in), A (rank, in), B (out, rank)."""
    out = {}
    for name, tensor in tensors.items():
        if is_adapter(name):
            continue
        if name.endswith(".base_layer.weight"):
            layer = name.removesuffix(".base_layer.weight")
            a = tensors[f"{layer}.lora_A.{ADAPTER}.weight"].float()
            b = tensors[f"{layer}.lora_B.{ADAPTER}.weight"].float()
            if a.shape[1] != tensor.shape[1] or b.shape[0] != tensor.shape[0]:
                raise RuntimeError(
                    f"{layer}: adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                    f"the weight {tuple(tensor.shape)}"
                )
            tensor = tensor.float() + scaling[layer] * (b @ a)
        out[checkpoint_name(name)] = tensor.to(dtype)
    return out


def peft_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors under the names peft saves and loads them by
    (`base_model.model.<layer>.lora_A.weight`)."""
    return {
        _PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."): t
        for name, t in tensors.items()
        if is_adapter(name)
    }
