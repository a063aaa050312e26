"""What any GGUF file (or split set) holds: architecture, lvgg metadata, and its routed experts per layer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from lvgg.gguf_files import resolve
from lvgg.models import GGUF_EXPERT_TENSOR


@dataclass
class LayerSummary:
    layer: int
    n_experts: int
    hidden_size: int
    intermediate_size: int
    types: dict[str, str]
    nbytes: int


@dataclass
class FileSummary:
    path: Path
    architecture: str
    metadata: dict[str, object]  # general.name and lvgg.* keys
    layers: list[LayerSummary]
    other_tensors: int
    other_bytes: int
    parts: int = 1  # files of a split GGUF


def inspect_gguf(spec: str | Path) -> FileSummary:
    """Headers only: a GGUF file, a split one's parts (named by the first) or a Hub quant
    (org/repo:QUANT, lvgg.gguf_files.resolve)."""
    files = resolve(spec)
    readers = []
    for part in files:
        try:
            readers.append(gguf.GGUFReader(part))
        except Exception as e:
            from lvgg import _bridge

            try:  # the store's header checks say what is wrong (truncated, not GGUF, ...) where gguf-py cannot
                _bridge.ExpertStore.check_files([str(p) for p in files])
            except ValueError as why:
                raise ValueError(str(why)) from e
            raise ValueError(f"{part} is not a readable GGUF file: {e}") from e
    meta: dict[str, object] = {}
    for name, field in readers[0].fields.items():
        if name.startswith(("lvgg.", "general.name", "general.architecture")) or ".expert_" in name:
            meta[name] = field.contents()
    layers: dict[int, LayerSummary] = {}
    other_tensors = other_bytes = 0
    for t in (t for r in readers for t in r.tensors):
        m = GGUF_EXPERT_TENSOR.fullmatch(t.name)
        if not m:
            other_tensors += 1
            other_bytes += int(t.n_bytes)
            continue
        layer, proj = int(m[1]), m[2]
        ne = [int(n) for n in t.shape.tolist()]  # ggml order: [in, out, experts]
        s = layers.setdefault(layer, LayerSummary(layer, ne[2], 0, 0, {}, 0))
        if proj == "down":
            s.intermediate_size, s.hidden_size = ne[0], ne[1]
        s.types[proj] = gguf.GGMLQuantizationType(t.tensor_type).name
        s.nbytes += int(t.n_bytes)
    return FileSummary(files[0], str(meta.get("general.architecture", "")), meta, [layers[k] for k in sorted(layers)],
                       other_tensors, other_bytes, len(files))
