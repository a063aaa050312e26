"""llama.cpp GGUF (single file or split set) -> experts file: expert tensors copied byte for
byte, or requantized when output types are given."""
from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np

from .experts_writer import CONVERTER_VERSION, PlannedTensor, layer_types_metadata, write_experts_gguf
from .output_types import check_row_length
from lvgg.gguf_files import resolve
from lvgg.models import GGUF_EXPERT_BIAS, GGUF_EXPERT_TENSOR
from lvgg.quantize import quantize

_SHAPE_KEYS = ("block_count", "embedding_length", "expert_count", "expert_used_count",
               "expert_feed_forward_length", "expert_shared_count", "leading_dense_block_count")


def convert_gguf(src: Path, out: Path, types: dict[str, gguf.GGMLQuantizationType] | None, threads: int,
                 quiet: bool = False) -> Path:
    files = resolve(src)
    readers = []
    for shard in files:
        try:
            readers.append(gguf.GGUFReader(shard))
        except Exception as e:  # gguf-py raises ValueError/struct errors on damaged files
            raise ValueError(f"{shard} is not a readable GGUF file: {e}") from e
    arch_field = readers[0].get_field("general.architecture")
    if arch_field is None:
        raise ValueError(f"{src} has no general.architecture")
    gguf_arch = str(arch_field.contents())

    planned = []
    found = sorted(((int(m[1]), m[2]), t) for r in readers for t in r.tensors
                   if (m := GGUF_EXPERT_TENSOR.fullmatch(t.name)))
    if not found:
        raise ValueError(f"{src} has no routed-expert tensors (blk.N.ffn_{{gate,up,down}}_exps.weight)")
    for (layer, proj), t in found:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # numpy order
        nbytes = int(t.n_bytes)
        if types is None or proj not in types or types[proj] == t.tensor_type:
            qtype = gguf.GGMLQuantizationType(t.tensor_type)
            produce = (lambda t=t: np.asarray(t.data).view(np.uint8))
        else:
            qtype = types[proj]
            check_row_length(qtype, shape[-1], t.name)
            produce = (lambda t=t, shape=shape, qtype=qtype:
                       quantize(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), qtype, threads))
        planned.append(PlannedTensor(t.name, qtype, shape, produce, nbytes))
    for t in (t for r in readers for t in r.tensors if GGUF_EXPERT_BIAS.fullmatch(t.name)):  # f32, as they are
        planned.append(PlannedTensor(t.name, gguf.GGMLQuantizationType(t.tensor_type),
                                     tuple(int(n) for n in reversed(t.shape.tolist())),
                                     lambda t=t: np.asarray(t.data).view(np.uint8), int(t.n_bytes)))

    head = hashlib.sha256()
    with open(files[0], "rb") as f:
        head.update(f.read(1 << 20))
    metadata: dict[str, object] = {
        "general.name": files[0].name,
        "lvgg.source_model": files[0].name,
        "lvgg.source_revision": "sha256-first-MiB:" + head.hexdigest()[:16],
        "lvgg.source_format": "gguf",
        "lvgg.architecture": gguf_arch,
        "lvgg.converter_version": CONVERTER_VERSION,
        "lvgg.layer_types": layer_types_metadata(planned),
    }
    for key in _SHAPE_KEYS:
        field = readers[0].get_field(f"{gguf_arch}.{key}")
        if field is not None:
            metadata[f"{gguf_arch}.{key}"] = int(field.contents())
    return write_experts_gguf(out, gguf_arch, metadata, planned, quiet)
