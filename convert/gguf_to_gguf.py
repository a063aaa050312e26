"""llama.cpp GGUF (single file or split set) -> experts file: expert tensors copied byte for
byte, or requantized when output types are given."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import gguf
import numpy as np

from .experts_writer import CONVERTER_VERSION, PlannedTensor, layer_types_metadata, write_experts_gguf
from .output_types import check_row_length
from lvgg.models import GGUF_EXPERT_TENSOR
from lvgg.quantize import quantize

SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
_SHAPE_KEYS = ("block_count", "embedding_length", "expert_count", "expert_used_count",
               "expert_feed_forward_length", "expert_shared_count", "leading_dense_block_count")


def split_set(first: Path) -> list[Path]:
    """All shards of a split GGUF given its first shard; [first] for a single file."""
    m = SPLIT.match(first.name)
    if not m:
        return [first]
    if int(m["i"]) != 1:
        raise ValueError(f"{first.name} is shard {int(m['i'])} of a split GGUF; pass the first one (-00001-of-...)")
    n = int(m["n"])
    shards = [first.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise FileNotFoundError(f"split GGUF {first.name} is missing shards: {', '.join(missing)}")
    return shards


def convert_gguf(src: Path, out: Path, types: dict[str, gguf.GGMLQuantizationType] | None, threads: int,
                 quiet: bool = False) -> Path:
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    readers = []
    for shard in split_set(src):
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

    head = hashlib.sha256()
    with open(src, "rb") as f:
        head.update(f.read(1 << 20))
    metadata: dict[str, object] = {
        "general.name": src.name,
        "lvgg.source_model": src.name,
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
