"""The training stage: SAMI fine-tuning with FSDP2 under torchrun (docs/method.md, 'The
objective').

Each micro-step takes `microBatchQueries` query blocks per process; a block is one query's
C prompts and C responses, scored as all C x C (constitution, response) sequences in one
forward pass, each distinct prompt computed once with its responses packed behind it
(`SamiScorer`). Only response tokens are scored (prompt masked exactly, EOS scored when the
model emitted it), through the LM head in chunks, never as a full-vocabulary float32
log-softmax over the batch. The (C, C) matrix is assembled from explicit index pairs and fed to
`sami_loss`. Blocks never straddle processes, so the loss needs no cross-rank gather.

Differences from the paper's code:
- gradient accumulation accumulates: the paper-era code zeroed gradients at every micro-step,
  so each optimizer step saw only the last micro-batch;
- the data order is a deterministic function of (seed, step), so a resumed run and a run with
  a different number of processes see the same blocks at the same step;
- training.lora trains LoRA adapters on a frozen base instead of every weight (the paper
  trains every weight; `sami_worker/lora.py`, docs/method.md, 'LoRA').

Run it:
    CPU, one process:   python -m sami_worker train --task task.json
    CPU or one GPU, N:  torchrun --nproc_per_node N -m sami_worker train --task task.json
    multi-node:         torchrun --nnodes $PET_NNODES --nproc_per_node $PET_NPROC_PER_NODE \\
                          --node_rank $PET_NODE_RANK --master_addr $PET_MASTER_ADDR \\
                          --master_port $PET_MASTER_PORT -m sami_worker train --task task.json

Outputs under the task's output prefix: state/step-NNNNNNNN/ (resumable sharded state, every
`checkpointEvery` steps; the newest complete one is resumed automatically; deleted once the
stage is complete unless the task keeps them), checkpoint/ (the
Hugging Face model vLLM loads next; with LoRA the adapter merged into it), adapter/ (with LoRA:
the adapter alone, as peft saves one), metrics.jsonl (one line per optimizer step) and
summary.json; the stage's manifest, written last, lists the latter two.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from sami_worker import distributed, lora, storage
from sami_worker.backends import resolve_model_dir
from sami_worker.common import fetch_model, open_uri, scratch_dir
from sami_worker.export import MAX_SHARD_BYTES, export_weights
from sami_worker.hf import (
    build_empty_model,
    has_weight_conversions,
    load_model,
    load_tokenizer,
    published_dtype,
)
from sami_worker.layout import ADAPTER, CHECKPOINT
from sami_worker.logprobs import (
    assemble_matrices,
    block_pairs,
    build_sequences,
    response_logprobs,
    share_prompts,
    shared_prompt_logprobs,
)
from sami_worker.memory import PhasePeaks
from sami_worker.objective import sami_loss
from sami_worker.records import read_dataset
from sami_worker.settings import export_shard_bytes
from sami_worker.tasks import TaskError, TrainTask

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATES = "state"  # under the stage prefix: the resumable training states, one per folder
KEEP_STATES = 2
# A training state holds what training changes: the frozen base weights of a LoRA run are
# read from the model folder again on resume, not saved every checkpointEvery steps. Loading
# is not strict about them only: dcp.load fails on any trainable key the state lacks.
STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Block:
    """One query: C prompts (token ids) and the C responses generated under them."""

    prompts: tuple[tuple[int, ...], ...]
    responses: tuple[tuple[int, ...], ...]


def read_blocks(local_dir: Path, eos_id: int | None) -> list[Block]:
    """Blocks from a generation stage's dataset (`sami_worker.records`, checked as it is read);
    EOS appended where the model emitted it, unless `eos_id` is None (training.scoreEos)."""
    blocks = []
    for r in read_dataset(local_dir):
        responses = [
            ids + ((eos_id,) if eos and eos_id is not None else ())
            for ids, eos in zip(r.response_token_ids, r.ended_with_eos, strict=True)
        ]
        blocks.append(Block(r.prompt_token_ids, tuple(responses)))
    return blocks


class BlockSchedule:
    """Which blocks each (step, micro-step, rank) trains on.

    Each optimizer step consumes G = world x accumulation x micro-batch blocks from a global
    sequence: epoch after epoch, each a seeded permutation truncated to a multiple of G (the
    remainder is dropped and logged, not padded with duplicates). The sequence depends only on
    the seed and G's factors' product, so 1 process x accumulation 2 and 2 processes x 1 see
    the same blocks in the same steps.
    """

    def __init__(self, blocks: list[Block], per_step: int, seed: int):
        n_blocks = len(blocks)
        if n_blocks < per_step:
            raise TaskError(
                f"the dataset has {n_blocks} query blocks but one optimizer step needs "
                f"{per_step} (processes x gradientAccumulation x microBatchQueries)"
            )
        self.blocks, self.n, self.per_step, self.seed = blocks, n_blocks, per_step, seed
        self.steps_per_epoch = n_blocks // per_step
        dropped = n_blocks - self.steps_per_epoch * per_step
        if dropped:
            log.info("each epoch drops %d of %d blocks to fill whole steps", dropped, n_blocks)

    def step_blocks(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = list(range(self.n))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order[offset * self.per_step : (offset + 1) * self.per_step]

    def micro_blocks(self, step: int, micro: int, rank: int, world: int, size: int) -> list[Block]:
        """This rank's blocks for one micro-step."""
        start = (micro * world + rank) * size
        return [self.blocks[i] for i in self.step_blocks(step)[start : start + size]]


def collate(blocks: list[Block], pad_id: int):
    """One padded batch holding every (constitution, response) pair of every block."""
    c = len(blocks[0].prompts)
    prompts = [p for b in blocks for p in b.prompts]
    responses = [r for b in blocks for r in b.responses]
    pairs = block_pairs(c, len(blocks))
    return build_sequences(prompts, responses, pairs, pad_id), c


# ---------------------------------------------------------------------------------------------
# Model


class SamiScorer(nn.Module):
    """The causal LM's trunk plus its LM head applied to response positions only.

    Each distinct prompt goes through the trunk once, followed by all the responses paired with
    it (`share_prompts`: in a block of C constitutions the C x C sequences repeat each prompt C
    times), when the model allows it exactly (`prompt_sharing_window`); otherwise the padded
    batch goes through as it is. Being the FSDP root, its forward unshards the embeddings,
    final norm and LM head weight for the log-prob functions, which read the weight directly
    instead of calling the head.
    """

    def __init__(self, model: nn.Module, share: bool = True):
        super().__init__()
        self.model = model
        self.share_window = prompt_sharing_window(model) if share else 0

    def forward(self, input_ids, attention_mask, response_mask):
        head = self.model.get_output_embeddings()
        packed = None
        if self.share_window is None or 0 < input_ids.shape[1] <= self.share_window:
            width = self.model.config.hidden_size
            packed = share_prompts(input_ids, attention_mask, response_mask, width=width)
        if packed is None:
            hidden = self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            return response_logprobs(hidden, head.weight, input_ids, response_mask, bias=head.bias)
        eager = self.model.config._attn_implementation == "eager"
        hidden = self.model.base_model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask(torch.float32 if eager else None),
            position_ids=packed.position_ids,
        ).last_hidden_state
        return shared_prompt_logprobs(hidden, head.weight, packed, bias=head.bias)


def prompt_sharing_window(model: nn.Module) -> int | None:
    """Up to which padded length `share_prompts` gives this model's exact outputs: None for
    any length, 0 for none.

    The repacked rows need attention that takes a custom 4D mask (sdpa, eager), positions read
    from position_ids (rotary embeddings), and only attention layers. A sliding window (or
    chunked attention) sees every key of sequences no longer than the window, so such models
    share prompts only for batches that short.
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return 0
    if not hasattr(model.base_model, "rotary_emb"):
        return 0
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not types <= {"full_attention", "sliding_attention"}:
        return 0
    windows = [
        getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) or "sliding_attention" in types
        else None,
        getattr(config, "attention_chunk_size", None),
    ]
    windows = [w for w in windows if w]
    return min(windows) if windows else None


# precision -> (dtype the parameters, gradients and optimizer state are kept in, FSDP2 policy).
# Gradients are reduce-scattered in float32 in every mode: a bfloat16 sum over many ranks
# loses the small updates a learning rate of 1e-6 makes.
PRECISIONS = {
    "bf16": (torch.bfloat16, MixedPrecisionPolicy(reduce_dtype=torch.float32)),
    "bf16-mixed": (
        torch.float32,
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    ),
    "fp32": (torch.float32, MixedPrecisionPolicy()),
}


def shard_model(scorer: SamiScorer, mp: MixedPrecisionPolicy) -> SamiScorer:
    """FSDP2: fully_shard each decoder layer, then the root. Works on a model whose
    parameters are still on the meta device (nothing is allocated until `to_empty`)."""
    model = scorer.model
    layer_types = tuple(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise TaskError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    # The root stays unsharded after forward: the LM head's backward reads the weight.
    fully_shard(scorer, mp_policy=mp, reshard_after_forward=False)
    return scorer


def build_sharded_scorer(model_dir: str, task: TrainTask, device: torch.device) -> SamiScorer:
    """The model built empty, sharded with FSDP2, then filled with the weights in `model_dir`:
    no process ever materialises the whole model (`load_weights`)."""
    t = task.training
    dtype, mp = PRECISIONS[t.precision]
    model = build_empty_model(model_dir, task.model, dtype)
    model.config.use_cache = False
    if t.lora is not None:
        # Before sharding: the adapters are sharded with their decoder layer like its weights.
        lora.add_adapters(model, t.lora)
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Training mode: Hugging Face layers checkpoint only when training (the checkpointed
    # forward is skipped in eval mode); the architectures trained here have no dropout (LoRA's
    # adapters may: training.lora.dropout).
    model.train()
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    scorer = shard_model(SamiScorer(model), mp)
    scorer.to_empty(device=device)
    with torch.no_grad():  # to_empty leaves buffers uninitialised: put the computed ones back
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    load_weights(model, model_dir, task, dtype)
    if t.lora is not None:
        fill_adapters(model, lora.initial_adapters(model, task.seed))
    return scorer


def load_weights(model: nn.Module, model_dir: str, task: TrainTask, dtype: torch.dtype) -> None:
    """Fill the sharded parameters from a Hugging Face folder.

    Where the safetensors files hold the model's own tensor names (Llama, Mistral, Qwen...),
    each rank reads only its slices of each tensor with torch.distributed.checkpoint's Hugging
    Face reader. Otherwise (weights transformers converts on load, such as Mixtral's experts,
    or pickled .bin files) rank 0 loads the model whole and broadcasts each tensor's shards,
    so that rank alone holds one full copy for the duration of the load.
    """
    state = {k: v for k, v in model.state_dict().items() if not lora.is_adapter(k)}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    # Under the checkpoint's names: a LoRA-wrapped layer's weight is its base_layer's.
    wanted = {lora.checkpoint_name(k): v for k, v in state.items() if k not in tied}
    stored: set[str] = set()
    if any(Path(model_dir).glob("*.safetensors")) and not has_weight_conversions(model):
        stored = set(HuggingFaceStorageReader(model_dir).read_metadata().state_dict_metadata)
    if stored and set(wanted) <= stored:
        dcp.load(wanted, storage_reader=HuggingFaceStorageReader(model_dir))
        return
    log.warning(
        "%s: the checkpoint's tensors are not the model's own (converted on load, or not "
        "safetensors); rank 0 loads it whole and broadcasts the shards",
        model_dir,
    )
    full = {}
    if distributed.is_main():
        loaded = load_model(model_dir, task.model, dtype=dtype).state_dict()
        full = {k: loaded[lora.checkpoint_name(k)] for k in state}
    # Not strict with adapters: fill_adapters sets them next.
    strict = len(state) == len(model.state_dict())
    set_model_state_dict(
        model,
        full,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict),
    )


def fill_adapters(model: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """Set each sharded adapter parameter from the full tensor every rank holds
    (`lora.initial_adapters`): each rank keeps its own shard, no communication."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in adapters.items():
            param = params[name]
            value = full.to(device=param.device, dtype=param.dtype)
            if isinstance(param, DTensor):
                value = distribute_tensor(
                    value, param.device_mesh, param.placements, src_data_rank=None
                )
            param.copy_(value)


def build_optimizer(params, task: TrainTask):
    """The optimizer over `params`: the trainable ones only (with LoRA, the adapters)."""
    params = [p for p in params if p.requires_grad]
    o = task.training.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.RMSprop(params, lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _state_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_state(states: storage.Storage) -> int | None:
    """Step of the newest complete training state; half-written ones have no manifest."""
    steps = sorted(
        {
            int(o.key.split("/")[0].removeprefix("step-"))
            for o in states.list()
            if o.key.startswith("step-") and o.key.endswith("/" + storage.MANIFEST_NAME)
        },
        reverse=True,
    )
    return next((s for s in steps if storage.is_complete(states, _state_name(s))), None)


def save_state(states, scorer, optimizer, scheduler, step: int, workdir: Path) -> None:
    """Sharded state with torch.distributed.checkpoint: each rank uploads the files it wrote,
    rank 0 publishes one manifest for all of them, last. The metrics so far travel with the
    state, so a resumed run keeps its history."""
    rank = distributed.rank()
    local = workdir / _state_name(step)
    model_sd, optim_sd = get_state_dict(scorer, optimizer, options=STATE_OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(local))
    torch.save(
        {"rng": torch.get_rng_state(), "py_rng": random.getstate()}, local / f"rng-{rank}.pt"
    )
    if rank == 0:
        (local / "trainer.json").write_text(
            json.dumps({"step": step, "scheduler": scheduler.state_dict()})
        )
        shutil.copy(workdir / METRICS_FILE, local / METRICS_FILE)
    distributed.barrier()
    mine = [f"rng-{rank}.pt"] + sorted(p.name for p in local.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        mine += [".metadata", "trainer.json", METRICS_FILE]
    files = storage.upload_files(states, _state_name(step), local, mine)
    everyone = [f for part in distributed.gather_objects(files) for f in part]
    if rank == 0:
        storage.publish_manifest(
            states, _state_name(step), everyone, stage="train-state", meta={"step": step}
        )
        for old in sorted({int(o.key[5:13]) for o in states.list() if o.key.startswith("step-")}):
            if old < step and old not in _newest(states, KEEP_STATES):
                states.delete_prefix(_state_name(old))
    distributed.barrier()
    shutil.rmtree(local, ignore_errors=True)


def _newest(states, n: int) -> set[int]:
    done = sorted(
        {int(o.key[5:13]) for o in states.list() if o.key.endswith(storage.MANIFEST_NAME)}
    )
    return set(done[-n:])


# What a torch.distributed.checkpoint .metadata file (a pickle) may refer to: the classes that
# describe a checkpoint, dtypes, sizes and layouts; nothing that runs code.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if module in _ALLOWED_MODULES else None
        described = module == _DCP_METADATA_MODULE and isinstance(found, type)
        dtype = module == "torch" and isinstance(found, torch.dtype)
        if (module, name) in _DCP_METADATA_GLOBALS or described or dtype:
            return found
        raise TaskError(f"{module}.{name} has no place in a training state's metadata")


_ALLOWED_MODULES = {_DCP_METADATA_MODULE} | {module for module, _ in _DCP_METADATA_GLOBALS}


def load_dcp_metadata(path: Path):
    """A checkpoint's .metadata, unpickled with only the globals a checkpoint description
    uses: whoever can write the run's storage cannot run code in the trainer (TaskError)."""
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise TaskError(f"{path.name}: not a training state's metadata: {err}") from None


class StateReader(FileSystemReader):
    """Reads a training state from storage, fetching only what this rank's shards need.

    torch.distributed.checkpoint says which (file, offset, length) items it reads. A file
    this rank wrote (the same number of processes) is fetched whole and checked against the
    state's manifest; from another rank's file only the items are read, with ranged requests,
    into a sparse local file of the listed size: the few replicated tensors (optimizer step
    counters) that checkpointing saved once, on whichever rank.
    """

    def __init__(self, states: storage.Storage, name: str, local: Path):
        super().__init__(str(local))
        self.remote = states.child(name)
        self.local = local
        manifest = storage.read_manifest(states, name)
        if manifest is None:
            raise storage.StageIncomplete(f"{self.remote.uri()} has no manifest")
        self.listed = {f.path: f for f in manifest.files}
        self.fetched: set[str] = set()
        self.ranged_bytes = 0

    def fetch(self, names) -> None:
        for name in sorted(set(names) - self.fetched):
            storage.download_listed_file(self.remote, self.listed[name], self.local)
            self.fetched.add(name)

    def read_metadata(self, *args, **kwargs):
        self.fetch([".metadata"])
        metadata = load_dcp_metadata(self.local / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        items: dict[str, list] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            items.setdefault(info.relative_path, []).append(info)
        own = f"__{distributed.rank()}_"
        self.fetch(name for name in items if name.startswith(own))
        for name, infos in items.items():
            if name in self.fetched:
                continue
            path = self.local / name
            with path.open("ab") as f:
                f.truncate(self.listed[name].size)
            with path.open("r+b") as f:
                for info in infos:
                    f.seek(info.offset)
                    f.write(self.remote.read_range(name, info.offset, info.length))
                    self.ranged_bytes += info.length
        return super().read_data(plan, planner)


def load_state(states, scorer, optimizer, scheduler, step: int, workdir: Path) -> None:
    local = workdir / f"resume-{_state_name(step)}"
    reader = StateReader(states, _state_name(step), local)
    model_sd, optim_sd = get_state_dict(scorer, optimizer, options=STATE_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=reader)
    set_state_dict(
        scorer,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=LOAD_OPTIONS,
    )
    mine = f"rng-{distributed.rank()}.pt"
    reader.fetch(["trainer.json", METRICS_FILE] + ([mine] if mine in reader.listed else []))
    log.info(
        "rank %d read %d of the state's %d files, and %d bytes of others: %s",
        distributed.rank(),
        len(reader.fetched),
        len(reader.listed),
        reader.ranged_bytes,
        json.dumps(sorted(reader.fetched)),
    )
    trainer = json.loads((local / "trainer.json").read_text())
    scheduler.load_state_dict(trainer["scheduler"])
    if distributed.is_main():
        shutil.copy(local / METRICS_FILE, workdir / METRICS_FILE)
    if (local / mine).exists():
        try:
            rng = torch.load(local / mine, weights_only=True)  # never code from storage
        except pickle.UnpicklingError as err:
            raise TaskError(f"{reader.remote.uri()}/{mine}: not a random state: {err}") from None
        torch.set_rng_state(rng["rng"])
        random.setstate(rng["py_rng"])
    shutil.rmtree(local, ignore_errors=True)


def export_checkpoint(out, scorer, tokenizer, dtype: torch.dtype, workdir: Path, meta: dict):
    """The trained model as a Hugging Face folder under checkpoint/, streamed (`export.py`):
    rank 0 uploads each weights file while the next is written, deletes it locally, and
    publishes the manifest last. Every rank must call it."""
    local = workdir / CHECKPOINT
    main = distributed.is_main()
    entries: list = []
    if main:
        storage.unpublish(out, CHECKPOINT)
    with ThreadPoolExecutor(max_workers=1) as uploader:
        pending = []

        def ship(name: str) -> None:
            pending.append(uploader.submit(_upload_and_drop, out, local, name))

        shard_bytes = export_shard_bytes() or MAX_SHARD_BYTES
        export_weights(scorer.model, dtype, local, shard_bytes, on_file=ship)
        if main:
            model = scorer.model
            model.config.dtype = dtype  # the exported weights' dtype, not the training one
            model.config.save_pretrained(local)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(local)
            tokenizer.save_pretrained(local)
        for future in pending:
            entries += future.result()
    if main:
        done = {e.path for e in entries}
        rest = sorted(p.name for p in local.iterdir() if p.is_file() and p.name not in done)
        entries += storage.upload_files(out, CHECKPOINT, local, rest)
        storage.publish_manifest(out, CHECKPOINT, entries, stage="checkpoint", meta=meta)
    distributed.barrier()


def export_adapter(out, scorer, task: TrainTask, dtype: torch.dtype, workdir: Path) -> None:
    """With training.lora, the adapter alone under adapter/, as peft saves one
    (adapter_config.json, adapter_model.safetensors): for peft, or vLLM's LoRA serving on top
    of the model the iteration started from. Every rank must call it (the adapters are
    gathered); rank 0 writes."""
    from safetensors.torch import save

    tensors = {}
    for name, param in scorer.model.named_parameters():
        if lora.is_adapter(name):
            full = param.full_tensor() if isinstance(param, DTensor) else param
            tensors[name] = full.detach().to(dtype).cpu().contiguous()
    if not distributed.is_main():
        return
    config = lora.lora_config(task.training.lora, base_model=task.init_uri or task.model.uri)
    config.inference_mode = True
    config.save_pretrained(workdir / ADAPTER)
    files = {
        lora.ADAPTER_CONFIG: (workdir / ADAPTER / lora.ADAPTER_CONFIG).read_bytes(),
        lora.ADAPTER_WEIGHTS: save(lora.peft_names(tensors), metadata={"format": "pt"}),
    }
    storage.write_stage_files(out, ADAPTER, files, stage="adapter")


def _upload_and_drop(out, local: Path, name: str) -> list:
    entries = storage.upload_files(out, CHECKPOINT, local, [name])
    (local / name).unlink()  # the cache volume holds one weights file at a time, not the model
    return entries


# ---------------------------------------------------------------------------------------------
# The loop


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class TrainRun:
    """What setup hands the loop and the publishing: this process's place in the job, its
    scratch folder, the data order, the sharded model with its optimizer and schedule, and
    the step to start from."""

    device: torch.device
    out: storage.Storage
    workdir: Path
    tokenizer: object
    pad_id: int
    schedule: BlockSchedule
    save_dtype: torch.dtype
    scorer: SamiScorer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    states: storage.Storage
    start: int
    peaks: PhasePeaks

    @property
    def rank(self) -> int:
        return distributed.rank()

    @property
    def world(self) -> int:
        return distributed.world_size()

    @property
    def metrics_path(self) -> Path:
        """Rank 0's metrics lines, one per step, published with the stage."""
        return self.workdir / METRICS_FILE


def run(task: TrainTask) -> dict:
    device = distributed.init()
    # Scratch space (datasets, resumed state, export files) on the cache volume, not the
    # container's root filesystem.
    with scratch_dir("train") as tmp:
        r = setup(task, device, Path(tmp))
        train_loop(task, r)
        summary = publish(task, r)
        distributed.barrier()
    distributed.shutdown()
    return summary


def setup(task: TrainTask, device: torch.device, workdir: Path) -> TrainRun:
    """Seed, download the datasets, build the sharded model and its optimizer, and resume
    from the newest complete training state if there is one."""
    out = open_uri(task.output, task.storage)
    t = task.training
    torch.manual_seed(task.seed)
    random.seed(task.seed)

    peaks = PhasePeaks(device)
    base_dir = resolve_model_dir(task.model.uri, lambda u: fetch_model(u, task.storage))
    init_dir = base_dir
    if task.init_uri:
        init_dir = resolve_model_dir(task.init_uri, lambda u: fetch_model(u, task.storage))
    tokenizer = load_tokenizer(base_dir, task.model)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    blocks: list[Block] = []
    for i, uri in enumerate(task.datasets):
        local = workdir / f"dataset-{i}"
        storage.download_stage(open_uri(uri, task.storage), "", local)
        blocks += read_blocks(local, tokenizer.eos_token_id if t.score_eos else None)
    size = t.micro_batch_queries
    per_step = distributed.world_size() * t.gradient_accumulation * size
    schedule = BlockSchedule(blocks, per_step, task.seed)

    peaks.start("load")
    save_dtype = published_dtype(init_dir)  # the export goes back to the model's dtype
    scorer = build_sharded_scorer(init_dir, task, device)
    optimizer = build_optimizer(scorer.parameters(), task)
    total = sum(p.numel() for p in scorer.parameters())
    log.info("training %d of %d parameters", trainable_parameters(scorer), total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, task.iteration_steps, t.optimizer.warmup_steps, t.optimizer.schedule
        ),
    )

    states = out.child(STATES)
    start = latest_state(states) or 0
    if start:
        log.info("resuming from %s at step %d", states.uri(_state_name(start)), start)
        load_state(states, scorer, optimizer, scheduler, start, workdir)
    peaks.end()
    return TrainRun(
        device=device,
        out=out,
        workdir=workdir,
        tokenizer=tokenizer,
        pad_id=pad_id,
        schedule=schedule,
        save_dtype=save_dtype,
        scorer=scorer,
        optimizer=optimizer,
        scheduler=scheduler,
        states=states,
        start=start,
        peaks=peaks,
    )


def train_loop(task: TrainTask, r: TrainRun) -> None:
    """The optimizer steps from r.start on: rank 0 appends each step's metrics and logs them;
    a training state is saved every `checkpointEvery` steps except after the last."""
    t = task.training
    r.peaks.start("train")
    for step in range(r.start, task.iteration_steps):
        row = train_step(r.scorer, r.optimizer, r.schedule, step, task, r.pad_id, r.device)
        r.scheduler.step()
        if r.rank == 0:
            with r.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info(
                "step %d/%d loss %.4f mi_lower_bound %.4f grad_norm %.3f %.0f tokens/s",
                step + 1,
                task.iteration_steps,
                row["loss"],
                row["mi_lower_bound"],
                row["grad_norm"],
                row["tokens_per_s"],
            )
        done = step + 1
        if done % t.checkpoint_every == 0 and done < task.iteration_steps:
            save_state(r.states, r.scorer, r.optimizer, r.scheduler, done, r.workdir)
            if r.rank == 0:  # progress for observers; the stage manifest lists it at the end
                r.out.write_bytes(METRICS_FILE, r.metrics_path.read_bytes())
    r.peaks.end()


def publish(task: TrainTask, r: TrainRun) -> dict:
    """Export the model, then (rank 0) write the metrics and summary with the stage's
    manifest and prune the training states; returns the summary (empty on other ranks)."""
    summary = {}
    if r.rank == 0:
        rows = [json.loads(line) for line in r.metrics_path.read_text().splitlines()]
        summary = summarize(rows, r.world, r.schedule.n, trainable_parameters(r.scorer))
    r.peaks.start("export")
    export_checkpoint(r.out, r.scorer, r.tokenizer, r.save_dtype, r.workdir, summary)
    if task.training.lora is not None:
        export_adapter(r.out, r.scorer, task, r.save_dtype, r.workdir)
    r.peaks.end()
    memory = distributed.gather_objects(r.peaks.report())
    if r.rank == 0:
        summary["memory"] = {"device": r.device.type, "ranks": memory}
        storage.write_stage_files(
            r.out,
            "",
            {
                METRICS_FILE: r.metrics_path.read_bytes(),
                SUMMARY_FILE: json.dumps(summary, indent=2).encode(),
            },
            stage="train",
            meta=summary,
        )
        prune_states(r.out, task)
    return summary


def prune_states(out: storage.Storage, task: TrainTask) -> None:
    """Once the stage is complete (its model exported, its manifest written) nothing resumes
    from its training states: delete them unless the task keeps them. Also run for a stage
    found complete (sami_worker.__main__), in case a crash came between its manifest and
    this."""
    if not task.keep_states and out.list(STATES):
        log.info("deleting the training states under %s (cleanup.trainingStates)", out.uri(STATES))
        out.delete_prefix(STATES)


def train_step(scorer, optimizer, schedule, step, task: TrainTask, pad_id, device) -> dict:
    """One optimizer step: accumulate over micro-steps, clip, update; metrics averaged over
    ranks."""
    t = task.training
    rank, world = distributed.rank(), distributed.world_size()
    accum, size = t.gradient_accumulation, t.micro_batch_queries
    started = time.perf_counter()
    sums = torch.zeros(5, dtype=torch.float64)
    tokens = 0
    for micro in range(accum):
        picked = schedule.micro_blocks(step, micro, rank, world, size)
        batch, c = collate(picked, pad_id)
        # "microStep" reduce-scatters after every micro-step (each rank keeps only its shard
        # of the gradients); "step" defers it to the last one, holding full gradients.
        scorer.set_requires_gradient_sync(t.gradient_sync == "microStep" or micro == accum - 1)
        scored = scorer(
            batch.input_ids.to(device),
            batch.attention_mask.to(device),
            batch.response_mask.to(device),
        )
        matrices = assemble_matrices(scored.mean, batch.pairs, c, len(picked))
        result = sami_loss(matrices)
        # Every block weighs the same in the step: the sum over this rank's blocks divided by
        # the blocks per rank per step; FSDP averages over ranks.
        (result.block_loss.sum() / (accum * size)).backward()
        sums += torch.tensor(
            [
                result.loss.item(),
                result.loss_row.item(),
                result.loss_col.item(),
                result.mi_lower_bound.item(),
                result.accuracy.item(),
            ],
            dtype=torch.float64,
        )
        tokens += int(batch.attention_mask.sum())
    clip = t.optimizer.grad_clip if t.optimizer.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(scorer.parameters(), clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    means = distributed.all_mean((sums / accum).tolist() + [tokens / elapsed], device)
    return {
        "step": step + 1,
        "loss": means[0],
        "loss_row": means[1],
        "loss_col": means[2],
        "mi_lower_bound": means[3],
        "diag_accuracy": means[4],
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens_per_s": means[5] * world,
        "peak_memory_mb": peak_memory_mb(device),
        "seconds": elapsed,
    }


def trainable_parameters(scorer: nn.Module) -> int:
    """Elements of the parameters the optimizer updates (whole tensors, not this rank's
    shards): every weight in full-weight training, the adapters alone with LoRA."""
    return sum(p.numel() for p in scorer.parameters() if p.requires_grad)


def summarize(rows: list[dict], world: int, n_blocks: int, trainable: int) -> dict:
    first, last = rows[0], rows[-1]
    return {
        "steps": len(rows),
        "processes": world,
        "blocks": n_blocks,
        "first_loss": first["loss"],
        "final_loss": last["loss"],
        "first_mi_lower_bound": first["mi_lower_bound"],
        "final_mi_lower_bound": last["mi_lower_bound"],
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "checkpoint": CHECKPOINT,
        "trainable_parameters": trainable,
    }
