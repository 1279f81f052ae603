"""The trained model as a Hugging Face folder, streamed: no process holds the whole model.

The FSDP2-sharded parameters are gathered one decoder layer at a time (every rank takes part in
each all-gather; rank 0 keeps the result), put back under the checkpoint's names and layouts
(transformers' own reverse conversion, e.g. Mixtral's fused experts split per expert), cast to
the dtype the model was published in, and written straight into safetensors files of at most
`max_shard_bytes` each. Each file's header is written before its data, from a plan made on
meta tensors, so no file is ever held in memory; `on_file` hears of each finished file while
the next is written (the training worker uploads it then). LoRA adapters (training.lora) are
merged into their base weights group by group as they are gathered (`lora.merge_adapters`), so
the folder is the same full model a full-weight run writes.

Why not `save_pretrained`: it needs the full state dict on one host, about 140 GB for a 70B
model in bfloat16 (280 GB in float32). Why not torch.distributed.checkpoint's Hugging Face
writer: its consolidation reads every rank's shard files from one filesystem, which the nodes
of a multi-node job do not share. And safetensors' Python API writes a whole dict at once, so
the header and the bytes are written here, to the format's published layout (an 8-byte
little-endian header length, the JSON header padded to 8 bytes, then the tensors in order).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sami_worker import distributed
from sami_worker.hf import to_checkpoint_format
from sami_worker.lora import merge_adapters, scalings

MAX_SHARD_BYTES = 5 * 10**9  # the Hugging Face hub's customary shard size
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def export_groups(model: nn.Module) -> list[list[tuple[str, torch.Tensor]]]:
    """The tensors a checkpoint holds, in state-dict order, one group per decoder layer (other
    tensors alone): parameters, tied ones once, and persistent buffers."""
    params = dict(model.named_parameters())  # a tied weight appears once, under its first name
    persistent = set(model.state_dict(keep_vars=True))
    tensors = {**params, **{n: b for n, b in model.named_buffers() if n in persistent}}
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        match = _LAYER.match(name)
        groups.setdefault(match.group(1) if match else name, []).append((name, tensor))
    return list(groups.values())


def plan_files(
    groups: list[dict[str, torch.Tensor]], max_shard_bytes: int
) -> list[list[tuple[str, torch.Size, torch.dtype]]]:
    """Checkpoint tensors (name, shape, dtype) split in order into files of at most
    `max_shard_bytes` (a larger single tensor gets a file of its own)."""
    files: list[list[tuple[str, torch.Size, torch.dtype]]] = [[]]
    size = 0
    for group in groups:
        for name, t in group.items():
            n = t.numel() * t.element_size()
            if files[-1] and size + n > max_shard_bytes:
                files.append([])
                size = 0
            files[-1].append((name, t.shape, t.dtype))
            size += n
    return files


def file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(entries: list[tuple[str, torch.Size, torch.dtype]]) -> bytes:
    """The length prefix and JSON header of a safetensors file holding `entries` in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors")
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape)}
        header[name]["data_offsets"] = [offset, end]
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (an all-gather for a sharded one: every rank calls it)."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach()


def export_weights(
    model: nn.Module,
    dtype: torch.dtype,
    target: Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_file: Callable[[str], None] | None = None,
) -> list[str]:
    """Write `model`'s weights into `target` as safetensors files (plus an index when there
    are several). Every rank must call it; rank 0 writes and returns the file names."""
    main = distributed.is_main()
    groups = export_groups(model)
    scaling = scalings(model)
    planned = [
        to_checkpoint_format(
            model,
            merge_adapters(
                {n: torch.empty(t.shape, dtype=dtype, device="meta") for n, t in group},
                scaling,
                dtype,
            ),
        )
        for group in groups
    ]
    files = plan_files(planned, max_shard_bytes)
    names = file_names(len(files))
    where = {entry[0]: i for i, entries in enumerate(files) for entry in entries}
    out: IO[bytes] | None = None
    current = -1

    def finish() -> None:
        if out is not None:
            out.close()
            if on_file:
                on_file(names[current])

    for group, meta in zip(groups, planned, strict=True):
        full = {name: _gathered(t) for name, t in group}
        if not main:
            continue
        merged = merge_adapters({n: t.cpu() for n, t in full.items()}, scaling, dtype)
        converted = to_checkpoint_format(model, merged)
        for name, planned_tensor in meta.items():
            tensor = converted[name].contiguous()
            if tensor.shape != planned_tensor.shape or tensor.dtype != dtype:
                raise RuntimeError(
                    f"{name}: converted to {tuple(tensor.shape)} {tensor.dtype}, planned "
                    f"{tuple(planned_tensor.shape)} {dtype}"
                )
            if where[name] != current:
                finish()
                current = where[name]
                target.mkdir(parents=True, exist_ok=True)
                out = (target / names[current]).open("wb")
                out.write(safetensors_header(files[current]))
            out.write(tensor.reshape(-1).view(torch.uint8).numpy())
    if not main:
        return []
    if len(names) > 1:
        weight_map = {entry[0]: names[i] for i, entries in enumerate(files) for entry in entries}
        total = sum(math.prod(s) * d.itemsize for entries in files for _, s, d in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (target / INDEX_FILE).write_text(json.dumps(index, indent=2))
    finish()
    return names
