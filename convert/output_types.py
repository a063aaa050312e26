"""Output types of converted experts: one for all projections, or one per projection.

gguf is imported where used: the command line imports this module for its help text.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lvgg.models import PROJECTIONS

if TYPE_CHECKING:
    import gguf

# What `--type` accepts: every ggml type ggml can quantize without an importance matrix.
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1",
               "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "MXFP4")


def parse_qtype(name: str) -> gguf.GGMLQuantizationType:
    if name.upper() not in QUANTIZABLE:
        raise ValueError(f"unsupported output type {name!r}; choose one of {', '.join(QUANTIZABLE)}")
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def projection_types(default: str, per_projection: str | None) -> dict[str, gguf.GGMLQuantizationType]:
    """--type Q4_K --types gate=Q4_K,down=Q6_K -> {gate: Q4_K, up: Q4_K, down: Q6_K}."""
    types = {p: parse_qtype(default) for p in PROJECTIONS}
    for item in (per_projection or "").split(","):
        if not item.strip():
            continue
        proj, sep, name = item.partition("=")
        proj = proj.strip()
        if not sep or proj not in PROJECTIONS:
            raise ValueError(f"--types takes PROJ=TYPE pairs with PROJ in {PROJECTIONS}, found {item!r}")
        types[proj] = parse_qtype(name.strip())
    return types


def check_row_length(qtype: gguf.GGMLQuantizationType, row_length: int, what: str) -> None:
    import gguf

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if row_length % block:
        raise ValueError(f"{what}: rows of {row_length} values cannot be stored as {qtype.name} (block size "
                         f"{block}); pick a type with a block size dividing {row_length}, e.g. Q8_0 or BF16")
