"""GGML expert tensors on the GPU, by Triton kernels: dequantized, or multiplied from their bytes.

    w = torch.empty(n_experts, rows, cols, dtype=torch.bfloat16, device="cuda")
    dequantize(raw, "Q4_K", w)          # raw: the tensor's GGUF bytes (uint8) on the same device

    act = gated_activations(x, gate, up, slot_expert)           # StagedProjection: experts' bytes
    out = weighted_down(act, down, topk_weights, slot_expert, x.dtype)   # a few tokens' experts

One block decoder per type turns blocks into values (every value gathers its block's scales
and its bits, all from L1), shared by both uses. Dequantization writes the values out (the
output may be a strided view with one stride per expert, e.g. the gate or up half of vLLM's
fused w13 buffer; rows and columns contiguous). The expert kernels, for decode steps of a few
tokens, multiply 16 rows x 256 columns at a time as they decode them, so an expert costs a
read of its bytes and no more. The layouts are ggml's (ggml-common.h), with the lookup tables
(the IQ types' grids, the values of IQ4_NL's and MXFP4's 4-bit codes) taken from gguf-py into one
small tensor per device; tests check every type against gguf-py's dequantization. The types lvgg's
CPU kernels run (PACKED_TYPES) may also be in lvgg's packed CPU layout (``packed=True``: tiles of
16 rows x 256 columns, vnni_kquants.h), which the GPU then reads from the CPU engine's own copy;
tests check it against the same values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import quants as gguf_quants

from lvgg import _bridge

try:  # Triton comes with CUDA builds of torch; CPU-only installs run the experts on the CPU only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# type -> (values per block, bytes per block); every block size divides the expert kernels' 256 columns a step
QUANT_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
                "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
                "IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "MXFP4": (32, 17),
                "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ3_XXS": (256, 98),
                "IQ3_S": (256, 110), "IQ1_S": (256, 50), "IQ1_M": (256, 56)}
SUPPORTED_TYPES = frozenset(FLOAT_TYPES) | frozenset(QUANT_BLOCKS)
# types with lvgg's packed CPU layout (ggml_bridge/src/vnni_kquants.h): groups of 16 rows
PACKED_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "Q8_0", "IQ4_NL", "MXFP4",
                          "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"})
PACKED_ROWS = 16
# the kernels' block decoders (_blocks), by type
_TYPE_CODES = {"Q4_0": 0, "Q5_0": 1, "Q8_0": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5, "F32": 6, "F16": 7, "BF16": 8,
               "Q4_1": 9, "Q5_1": 10, "Q2_K": 11, "Q3_K": 12, "IQ4_NL": 13, "IQ4_XS": 14, "MXFP4": 15,
               "IQ2_XXS": 16, "IQ2_XS": 17, "IQ2_S": 18, "IQ3_XXS": 19, "IQ3_S": 20, "IQ1_S": 21, "IQ1_M": 22}
# The decoders' lookup tables, end to end in one int8 tensor per device (_lookup_tables): the grids
# of the IQ types and the values of 4-bit codes (IQ4_NL's, also IQ4_XS's; MXFP4's e2m1, doubled),
# as gguf-py's classes carry ggml's: (class, its table's entries), each table's offset below.
_TABLE_PARTS = (("IQ2_XXS", 256 * 8), ("IQ2_XS", 512 * 8), ("IQ2_S", 1024 * 8), ("IQ3_XXS", 256 * 4),
                ("IQ3_S", 512 * 4), ("IQ1_S", 2048 * 8), ("IQ4_NL", 16), ("MXFP4", 16))
_TABLE_AT = [sum(size for _, size in _TABLE_PARTS[:i]) for i in range(len(_TABLE_PARTS))]
_TABLES: dict[torch.device, torch.Tensor] = {}


def raw_nbytes(ggml_type: str, n_values: int) -> int:
    """Bytes that ``n_values`` values of ``ggml_type`` (a name, either case) take in a GGUF file."""
    ggml_type = ggml_type.upper()
    if ggml_type in FLOAT_TYPES:
        return n_values * FLOAT_TYPES[ggml_type].itemsize
    qk, size = QUANT_BLOCKS[ggml_type]
    return n_values // qk * size


def packed_nbytes(ggml_type: str, rows: int, cols: int) -> int:
    """Bytes of one [rows, cols] matrix in lvgg's packed layout (ValueError where it has none)."""
    return _bridge.packed_size(_bridge.type_from_name(ggml_type.upper()), rows, cols)


def matrix_nbytes(ggml_type: str, rows: int, cols: int, packed: bool = False) -> int:
    """Bytes of one [rows, cols] matrix of ``ggml_type``, in the file's layout or lvgg's packed one."""
    return packed_nbytes(ggml_type, rows, cols) if packed else raw_nbytes(ggml_type, rows * cols)


def _lookup_tables(device: torch.device) -> torch.Tensor:
    """The block decoders' lookup tables (_TABLE_PARTS) on ``device``, made there on first use;
    later calls neither allocate nor copy (CUDA graphs can capture them)."""
    tables = _TABLES.get(device)
    if tables is None:
        parts = []
        for name, size in _TABLE_PARTS:
            cls = getattr(gguf_quants, name)
            if cls.grid_hex is not None:
                cls.init_grid()
            values = np.asarray(cls.kvalues if cls.grid_hex is None else cls.grid, dtype=np.int8).reshape(-1)
            if values.size != size:
                raise RuntimeError(f"gguf-py's {name} table has {values.size} entries; the kernels read {size}")
            parts.append(values)
        tables = _TABLES[device] = torch.from_numpy(np.concatenate(parts)).to(device)
    return tables


def dequantize(raw: torch.Tensor, ggml_type: str, out: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """Write the values of ``raw`` (uint8, the GGUF bytes of an [E, rows, cols] tensor, or with
    ``packed`` its E matrices in lvgg's packed layout) into ``out`` ([E, rows, cols],
    float32/float16/bfloat16, rows and columns contiguous)."""
    ggml_type = ggml_type.upper()
    if ggml_type not in (PACKED_TYPES if packed else SUPPORTED_TYPES):
        raise ValueError(f"no GPU dequantization for {ggml_type}{' in the packed layout' if packed else ''}; "
                         f"supported: {sorted(PACKED_TYPES if packed else SUPPORTED_TYPES)}")
    if out.dim() != 3 or out.stride(2) != 1 or out.stride(1) != out.shape[2]:
        raise ValueError(f"out must be [experts, rows, cols] with contiguous rows, found shape {list(out.shape)} "
                         f"strides {list(out.stride())}")
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out must be float32, float16 or bfloat16, found {out.dtype}")
    n_experts, rows, cols = out.shape
    qk, block_bytes = QUANT_BLOCKS.get(ggml_type, (1, 0))
    if cols % qk:
        raise ValueError(f"{ggml_type} rows hold whole blocks of {qk} values; found {cols} columns")
    expected = n_experts * matrix_nbytes(ggml_type, rows, cols, packed)
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != expected or raw.device != out.device:
        layout = f"{ggml_type}, packed" if packed else ggml_type
        raise ValueError(f"raw must be {expected} uint8 bytes on {out.device} ({layout}, {n_experts}x{rows}x{cols}); "
                         f"found {raw.numel()} {raw.dtype} on {raw.device}")
    if ggml_type in FLOAT_TYPES:
        out.copy_(raw.view(FLOAT_TYPES[ggml_type]).view(n_experts, rows, cols))
        return out
    if triton is None:
        raise RuntimeError("GPU dequantization needs Triton (it comes with CUDA builds of torch)")
    if packed:
        groups = rows // PACKED_ROWS  # rows % 16 == 0: packed_nbytes checked the layout
        if n_experts and groups:
            _dequantize_packed[(n_experts * groups, triton.cdiv(cols, _CHUNK))](
                raw, _lookup_tables(out.device), out, groups, cols, out.stride(0), expected // n_experts,
                expected // n_experts // groups,
                TYPE=_TYPE_CODES[ggml_type])
        return out
    n_blocks = n_experts * rows * cols // qk
    blocks_per_program = 4096 // qk
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    _dequantize[grid](raw, _lookup_tables(out.device), out, n_blocks, rows * cols, out.stride(0),
                      BLOCKS=blocks_per_program, QK=qk, BLOCK_BYTES=block_bytes, TYPE=_TYPE_CODES[ggml_type])
    return out


@dataclass(frozen=True)
class StagedProjection:
    """One projection (gate, up or down) of some experts as their GGUF bytes on the device:
    ``data[s]`` ([slots, bytes] uint8) holds slot s's expert, rows x cols values row-major from
    byte ``at`` (e.g. the up half of a fused gate_up starts ``rows`` rows in), or with ``packed``
    in lvgg's packed layout (groups of 16 rows)."""
    data: torch.Tensor
    ggml_type: str
    rows: int
    cols: int
    at: int = 0
    packed: bool = False

    def geometry(self) -> tuple[int, int, int]:
        """(block decoder code, values per block, bytes per block); floats count as blocks of 32."""
        t = self.ggml_type.upper()
        if t not in SUPPORTED_TYPES:
            raise ValueError(f"no GPU kernels for {t} experts; supported: {sorted(SUPPORTED_TYPES)}")
        qk, size = QUANT_BLOCKS[t] if t in QUANT_BLOCKS else (32, 32 * FLOAT_TYPES[t].itemsize)
        return _TYPE_CODES[t], qk, size

    def line_bytes(self) -> int:
        """Bytes of a row, or of a group of 16 rows when packed."""
        if self.packed:
            return packed_nbytes(self.ggml_type, PACKED_ROWS, self.cols)
        return raw_nbytes(self.ggml_type, self.cols)

    def check(self, name: str, rows: int, cols: int, slots: int, device: torch.device) -> tuple[int, int, int]:
        """``geometry()``; raises unless this holds ``slots`` experts of rows x cols on ``device``
        (and Triton is here)."""
        geometry = self.geometry()
        qk = geometry[1]
        if (self.rows, self.cols) != (rows, cols) or cols % qk:
            raise ValueError(f"{name} must be {rows}x{cols} ({self.ggml_type}: rows of whole blocks of {qk}), "
                             f"found {self.rows}x{self.cols}")
        if self.packed and (self.ggml_type.upper() not in PACKED_TYPES or rows % PACKED_ROWS):
            raise ValueError(f"{name} in the packed layout must be {sorted(PACKED_TYPES)} in groups of {PACKED_ROWS} "
                             f"rows, found {self.ggml_type} with {rows} rows")
        d, need = self.data, self.at + matrix_nbytes(self.ggml_type, rows, cols, self.packed)
        if d.dtype != torch.uint8 or d.dim() != 2 or not d.is_contiguous() or d.device != device \
                or d.shape[0] < slots or d.shape[1] < need:
            raise ValueError(f"{name} bytes must be contiguous uint8 [>= {slots}, >= {need}] on {device}, found "
                             f"{d.dtype} {list(d.shape)} on {d.device}")
        if triton is None:
            raise RuntimeError("GPU experts need Triton (it comes with CUDA builds of torch)")
        return geometry


def _check_slot_expert(slot_expert: torch.Tensor, n: int, device: torch.device) -> int:
    """Slots per token of ``slot_expert`` ([n tokens, g] int32 on ``device``), or raise."""
    if slot_expert.dim() != 2 or slot_expert.shape[0] != n or slot_expert.dtype != torch.int32 \
            or not slot_expert.is_contiguous() or slot_expert.device != device:
        raise ValueError(f"slot_expert must be contiguous int32 [{n}, experts per token] on {device}, found "
                         f"{slot_expert.dtype} {list(slot_expert.shape)} on {slot_expert.device}")
    return slot_expert.shape[1]


def gated_activations(x: torch.Tensor, gate: StagedProjection, up: StagedProjection,
                      slot_expert: torch.Tensor) -> torch.Tensor:
    """``act[s] = silu(gate_e(x[t])) * up_e(x[t])`` for slot s = t * g + j, e = slot_expert[t, j]:
    the first half of n tokens' SwiGLU experts, multiplied straight from their GGUF bytes (no
    dequantized copy). x: [n, hidden] float on the device; gate and up: intermediate rows of
    hidden columns, one staged expert per row of their data; slot_expert: [n, g] int32 on the
    device, the staged expert of each slot or -1 for none (its row of act is left as it is;
    values past the staged experts read the last one: they are never checked on the host).
    Returns float32 [n * g, intermediate], in the current stream's order; ``weighted_down``
    finishes the experts."""
    if x.dim() != 2 or not x.is_floating_point() or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float [tokens, hidden] tensor, found {x.dtype} {list(x.shape)}")
    n, hidden = x.shape
    g = _check_slot_expert(slot_expert, n, x.device)
    tg, qg, bg = gate.check("gate", gate.rows, hidden, 1, x.device)
    tu, qu, bu = up.check("up", gate.rows, hidden, 1, x.device)
    if gate.packed != up.packed:
        raise ValueError("gate and up must be both packed or both in the file's layout")
    staged = min(gate.data.shape[0], up.data.shape[0])
    act = torch.empty(n * g, gate.rows, dtype=torch.float32, device=x.device)
    if n * g:
        _gated_activations[(n * g, triton.cdiv(gate.rows, _ROWS_PER_PROGRAM))](
            x, gate.data, up.data, _lookup_tables(x.device), act, slot_expert, g, staged, hidden, gate.rows,
            gate.data.shape[1], up.data.shape[1], gate.at, up.at, gate.line_bytes(), up.line_bytes(),
            R=_ROWS_PER_PROGRAM, CHUNK=_CHUNK, TYPE_G=tg, QK_G=qg, BB_G=bg, TYPE_U=tu, QK_U=qu, BB_U=bu,
            PACKED=gate.packed)
    return act


def weighted_down(act: torch.Tensor, down: StagedProjection, weights: torch.Tensor, slot_expert: torch.Tensor,
                  dtype: torch.dtype, lead: int = 0) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * down_e(act[s])``, s = t * g + j, e = slot_expert[t, j],
    over the slots with an expert (weights: float32 [n, g]; act: ``gated_activations``' result;
    down: hidden rows of intermediate columns, one staged expert per row of its data; act's
    columns are down's from ``lead`` on, down's others multiply zeros: a share's rows within
    whole blocks). Returns [n, hidden] in ``dtype`` (float32 sums; a token without an expert gets
    0), in the current stream's order."""
    if weights.dim() != 2 or weights.dtype != torch.float32 or not weights.is_contiguous():
        raise ValueError(f"weights must be contiguous float32 [tokens, experts per token], found {weights.dtype} "
                         f"{list(weights.shape)}")
    n, g = weights.shape
    if _check_slot_expert(slot_expert, n, weights.device) != g:
        raise ValueError(f"slot_expert must be [{n}, {g}] like the weights, found {list(slot_expert.shape)}")
    if act.dtype != torch.float32 or act.dim() != 2 or act.shape[0] != n * g or not act.is_contiguous():
        raise ValueError(f"act must be contiguous float32 [{n * g}, intermediate], found {act.dtype} {list(act.shape)}")
    if not 0 <= lead <= down.cols - act.shape[1]:
        raise ValueError(f"act's {act.shape[1]} columns from lead {lead} must lie within down's {down.cols}")
    staged = down.data.shape[0]
    code, qk, block_bytes = down.check("down", down.rows, down.cols, 1, act.device)
    out = torch.empty(n, down.rows, dtype=dtype, device=act.device)
    if n:
        _weighted_down[(n, triton.cdiv(down.rows, _ROWS_PER_PROGRAM))](
            act, down.data, _lookup_tables(act.device), weights, slot_expert, out, g, staged, down.rows, down.cols,
            act.shape[1], lead, down.data.shape[1], down.line_bytes(), R=_ROWS_PER_PROGRAM, CHUNK=_CHUNK, TYPE=code,
            QK=qk, BB=block_bytes, PACKED=down.packed)
    return out


def split_routing(topk_ids: torch.Tensor, gpu_slots: int, real_rows: torch.Tensor | None = None,
                  most: int | None = None, held: range | None = None, counts: torch.Tensor | None = None,
                  counts_mirror: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Share a step's distinct experts between the CPU and the GPU, on the device (capturable).

    topk_ids: [n, k] int32/int64 on the GPU (-1: a slot without an expert); real_rows: None, or
    a one-element int32 tensor on the GPU: rows from there on are padding, their slots left
    without an expert (a value outside 0..n-1: every row is real); held: None, or the experts
    [start, stop) this rank computes (an expert-parallel rank's), the others' slots left without
    an expert. Of the d distinct experts, in the order they first appear, the GPU takes the last
    m = round(d * gpu_slots / k) (half up; one token's last ``gpu_slots``), each once however many
    tokens chose it, but no more than ``most`` (default n * gpu_slots, which m never passes; the
    CPU keeps the rest). counts: None, or one int64 on the GPU that m is added to (the experts the
    GPU will fetch); counts_mirror: None, or one int64 in pinned host memory that the sum is also
    written to (posted: no round trip), which the host reads without a CUDA call.
    Returns int32 tensors on the device:
      cpu_ids [n, k]: topk_ids with the GPU's experts (and those not held) replaced by -1 (the
        CPU engine's share);
      gpu_experts [min(most, n * gpu_slots)]: the GPU's experts, then -1;
      slot_expert [n, k]: each slot's index in gpu_experts, or -1 where the CPU has it.
    """
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be [tokens, experts per token] int32/int64, found {topk_ids.dtype} "
                         f"{list(topk_ids.shape)}")
    n, k = topk_ids.shape
    if not 0 < gpu_slots < k:
        raise ValueError(f"gpu_slots must be 1..{k - 1} (of {k} experts per token), found {gpu_slots}")
    if real_rows is not None and (real_rows.numel() != 1 or real_rows.dtype != torch.int32
                                  or real_rows.device != topk_ids.device):
        raise ValueError(f"real_rows must be one int32 on {topk_ids.device}, found {real_rows.dtype} "
                         f"{list(real_rows.shape)} on {real_rows.device}")
    if most is not None and most < 1:
        raise ValueError(f"most must be at least 1 (the GPU's experts per call), found {most}")
    if counts is not None and (counts.numel() != 1 or counts.dtype != torch.int64 or counts.device != topk_ids.device):
        raise ValueError(f"counts must be one int64 on {topk_ids.device}, found {counts.dtype} {list(counts.shape)} "
                         f"on {counts.device}")
    if counts_mirror is not None and (counts is None or counts_mirror.numel() != 1 or counts_mirror.dtype != torch.int64
                                      or not (counts_mirror.is_pinned() or counts_mirror.device == topk_ids.device)):
        raise ValueError(f"counts_mirror must be one int64 in pinned host memory beside counts, found "
                         f"{counts_mirror.dtype} {list(counts_mirror.shape)} on {counts_mirror.device}")
    if held is not None and (held.step != 1 or not 0 <= held.start < held.stop < 2**31):
        raise ValueError(f"held must be a range of experts [start, stop), 0 <= start < stop, found {held}")
    held = held or range(2**31 - 1)
    most = n * gpu_slots if most is None else min(most, n * gpu_slots)
    if triton is None:
        raise RuntimeError("splitting experts on the GPU needs Triton (it comes with CUDA builds of torch)")
    cpu_ids = torch.empty(n, k, dtype=torch.int32, device=topk_ids.device)
    slot_expert = torch.empty_like(cpu_ids)
    gpu_experts = torch.empty(most, dtype=torch.int32, device=topk_ids.device)
    if n:
        _split_routing[(1,)](topk_ids.contiguous(), topk_ids if real_rows is None else real_rows, cpu_ids, gpu_experts,
                             slot_expert, gpu_experts if counts is None else counts,
                             gpu_experts if counts_mirror is None else counts_mirror, n, k, gpu_slots, most, held.start,
                             held.stop, COUNTED=real_rows is not None, COUNT_FETCHES=counts is not None,
                             MIRROR=counts_mirror is not None,
                             SLOTS=triton.next_power_of_2(n * k), MOST=triton.next_power_of_2(most))
    return cpu_ids, gpu_experts, slot_expert


# rows of a projection per program, and columns per step, of the expert kernels: a packed tile's
_ROWS_PER_PROGRAM, _CHUNK = PACKED_ROWS, 256


def gather_rows(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, first: int = 0) -> torch.Tensor:
    """``out[j] = src[ids[j] - first]`` by a kernel on ``out``'s device, in the current stream's order.

    src: [rows, n] or [rows, lines, n] uint8, its last dimension contiguous, any other strides:
    e.g. one projection's bytes with a row per expert, or a tensor-parallel rank's share of them
    (some lines of each expert's, or some bytes of each of its lines). It may be host memory
    registered with CUDA (the GPU then reads it over the link: no host code runs, so a CUDA graph
    can capture the call). ids: [m] int32/int64 on ``out``'s device, read by the kernel: ones below
    ``first`` are skipped (their rows of out are left as they are), ones past the last row read the
    last row (they are never checked on the host, which would synchronize). ``first``: the id of
    src's row 0 (an expert-parallel part's first expert, as the router numbers it; >= 0).
    out: [m, *src.shape[1:]] uint8, its last dimension contiguous.
    """
    if src.dtype != torch.uint8 or src.dim() not in (2, 3) or src.stride(-1) != 1:
        raise ValueError(f"src must be [rows, bytes] or [rows, lines, bytes] uint8 with contiguous bytes, found "
                         f"{src.dtype} {list(src.shape)} strides {list(src.stride())}")
    m = ids.numel()
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or ids.device != out.device:
        raise ValueError(f"ids must be a 1-d int32/int64 tensor on {out.device}, found {ids.dtype} "
                         f"{list(ids.shape)} on {ids.device}")
    if out.dtype != torch.uint8 or tuple(out.shape) != (m, *src.shape[1:]) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{m}, {', '.join(map(str, src.shape[1:]))}] uint8 with contiguous bytes, "
                         f"found {out.dtype} {list(out.shape)} strides {list(out.stride())}")
    if first < 0:
        raise ValueError(f"first is the id of src's row 0, at least 0; found {first}")
    if triton is None:
        raise RuntimeError("gathering expert bytes needs Triton (it comes with CUDA builds of torch)")
    if m == 0 or src.shape[1:].numel() == 0:
        return out
    s, o = (src, out) if src.dim() == 3 else (src[:, None], out[:, None])
    if all(v % 4 == 0 for v in (s.shape[2], *s.stride()[:2], *o.stride()[:2], s.data_ptr(), o.data_ptr())):
        s, o = s.view(torch.int32), o.view(torch.int32)  # whole 4-byte words
    chunk, size = 2048, s.shape[1] * s.shape[2]
    _gather_rows[(m, triton.cdiv(size, chunk))](s, ids, o, first, s.shape[0], s.stride(0), s.stride(1),
                                                o.stride(0), o.stride(1), size, s.shape[2], CHUNK=chunk)
    return out


if triton is not None:

    @triton.jit
    def _f16_at(p, mask):
        """The little-endian float16 at byte pointer p, as float32."""
        lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _u8_at(p, mask):
        return tl.load(p, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _u16_at(p, mask):
        """The little-endian uint16 at byte pointer p, as int32."""
        return _u8_at(p, mask) | (_u8_at(p + 1, mask) << 8)

    @triton.jit
    def _u32_at(p, mask):
        """The little-endian uint32 at byte pointer p, as int32 (bit 31 the sign: shift, then mask)."""
        return _u16_at(p, mask) | (_u16_at(p + 2, mask) << 16)

    @triton.jit
    def _k_scale_min(scales, j, mask):
        """Sub-block j's 6-bit scale and min from a K-quant block's 12 packed bytes."""
        low = j < 4
        a = _u8_at(scales + j + 4, mask)
        b = _u8_at(scales + tl.where(low, j, j - 4), mask)
        c = _u8_at(scales + j, mask)
        sc = tl.where(low, b & 63, (a & 0xF) | ((b >> 6) << 4))
        m = tl.where(low, a & 63, (a >> 4) | ((c >> 6) << 4))
        return sc.to(tl.float32), m.to(tl.float32)

    # the lookup tables' offsets in _lookup_tables' tensor
    (_IQ2_XXS_GRID, _IQ2_XS_GRID, _IQ2_S_GRID, _IQ3_XXS_GRID, _IQ3_S_GRID, _IQ1_S_GRID, _IQ4_NL_VALUES,
     _MXFP4_VALUES) = map(tl.constexpr, _TABLE_AT)

    @triton.jit
    def _nibbles(p, i, mask):
        """Code i (0..31) of a run of 32 4-bit codes in the 16 bytes at p: low nibbles first, then high."""
        q = _u8_at(p + i % 16, mask)
        return tl.where(i < 16, q & 0xF, q >> 4)

    @triton.jit
    def _ksign(k, b):
        """Whether sign b (0..7) of ggml's ksigns_iq2xs entry k (7 bits) is minus: bit b of k, the
        8th making the count of minus signs even."""
        parity = k ^ (k >> 4)
        parity ^= parity >> 2
        parity ^= parity >> 1
        return (((k | ((parity & 1) << 7)) >> b) & 1) == 1

    @triton.jit
    def _xxs_values(grid, word, field, b, d, STEP: tl.constexpr):
        """IQ2_XXS/IQ3_XXS: grid values signed and scaled by their sub-block's 32-bit word: four 7-bit
        ksigns entries (``field``, 8 values each; sign ``b`` of it), then a 4-bit scale s in the top
        bits, d * (s + 1/2) * STEP."""
        db = d * (0.5 + ((word >> 28) & 15).to(tl.float32)) * STEP
        return db * tl.where(_ksign((word >> (7 * field)) & 127, b), -grid, grid)

    @triton.jit
    def _iq2_scales(p, h, mask, d):
        """IQ2_XS/IQ2_S: the scale of half h of a sub-block from its byte at p, a 4-bit s for each
        half (low nibble first): d * (s + 1/2) / 4."""
        s = (_u8_at(p, mask) >> (4 * h)) & 0xF
        return d * (0.5 + s.to(tl.float32)) * 0.25

    @triton.jit
    def _iq1_values(tables, index, v, minus):
        """IQ1_S/IQ1_M: value v of iq1s_grid's entry ``index`` (-1, 0 or 1) plus delta, 1/8 (-1/8
        where ``minus``)."""
        return tl.load(tables + _IQ1_S_GRID + 8 * index + v).to(tl.float32) + tl.where(minus, -0.125, 0.125)

    # Block decoders: the values of the blocks starting at byte offsets ``base`` ([N] int64) of
    # ``src``, as float32 [N, values per block] (256-value blocks: [N, sub-blocks, values per
    # sub-block]); blocks where ``mask`` ([N]) is false read as 0. ``tables``: the lookup tables
    # (_lookup_tables). The layouts are ggml's (ggml-common.h). The grid types' sub-blocks hold 32
    # values, their grid entries 8 (IQ2, IQ1) or 4 (IQ3): decoded as [N, entries, values], every
    # entry's index and signs read once.

    @triton.jit
    def _q4_0_blocks(src, base, mask, MIN: tl.constexpr, FIFTH_BITS: tl.constexpr):
        # d (f16), (Q4_1, Q5_1: min m, f16), (Q5_0, Q5_1: 32 fifth bits, bit i of 4 bytes for value i),
        # 16 bytes of nibbles (_nibbles): d * q + m, or d * (q - 8), d * (q - 16) with fifth bits
        i = tl.arange(0, 32)[None, :]
        at, m = src + base[:, None], mask[:, None]
        d = _f16_at(src + base, mask)[:, None]
        q = _nibbles(at + 2 + 2 * MIN + 4 * FIFTH_BITS, i, m)
        if FIFTH_BITS:
            q = q | (((_u8_at(at + 2 + 2 * MIN + i // 8, m) >> (i % 8)) & 1) << 4)
        if MIN:
            return d * q.to(tl.float32) + _f16_at(src + base + 2, mask)[:, None]
        return d * (q - 8 - 8 * FIFTH_BITS).to(tl.float32)

    @triton.jit
    def _q8_0_blocks(src, base, mask):
        i = tl.arange(0, 32)[None, :]
        d = _f16_at(src + base, mask)[:, None]
        q = tl.load(src + base[:, None] + 2 + i, mask=mask[:, None], other=0).to(tl.int8, bitcast=True)
        return d * q.to(tl.float32)

    @triton.jit
    def _iq4_nl_blocks(src, base, mask, tables):
        # d (f16), 16 bytes of nibbles (_nibbles) choosing one of IQ4_NL's 16 values v: d * v
        q = _nibbles(src + base[:, None] + 2, tl.arange(0, 32)[None, :], mask[:, None])
        return _f16_at(src + base, mask)[:, None] * tl.load(tables + _IQ4_NL_VALUES + q).to(tl.float32)

    @triton.jit
    def _mxfp4_blocks(src, base, mask, tables):
        # an e8m0 exponent e, 16 bytes of e2m1 nibbles (_nibbles; MXFP4's table holds their values
        # doubled): v * 2^(e - 128), ggml's ggml_e8m0_to_fp32_half (subnormal for e < 2)
        e = _u8_at(src + base, mask)[:, None]
        d = tl.where(e < 2, 0x200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
        q = _nibbles(src + base[:, None] + 1, tl.arange(0, 32)[None, :], mask[:, None])
        return tl.load(tables + _MXFP4_VALUES + q).to(tl.float32) * d

    @triton.jit
    def _q2_k_blocks(src, base, mask):
        # 16 scale bytes (sub-block s of 16 values: scale in the low nibble, min in the high one),
        # 64 bytes of 2-bit codes, d, dmin (f16). Sub-block s's codes are 2-bit field (s % 8) // 2
        # of bytes 32 * (s // 8) + lane, lane = 16 * (s % 2) + u.
        s = tl.arange(0, 16)[None, :, None]
        lane = 16 * (s % 2) + tl.arange(0, 16)[None, None, :]
        b3, m3 = base[:, None, None], mask[:, None, None]
        q = (_u8_at(src + b3 + 16 + 32 * (s // 8) + lane, m3) >> (2 * ((s % 8) // 2))) & 3
        sc = _u8_at(src + b3 + s, m3)
        d = _f16_at(src + base + 80, mask)[:, None, None]
        dmin = _f16_at(src + base + 82, mask)[:, None, None]
        return d * (sc & 0xF).to(tl.float32) * q.to(tl.float32) - dmin * (sc >> 4).to(tl.float32)

    @triton.jit
    def _q3_k_blocks(src, base, mask):
        # 32 bytes of high bits, 64 bytes of 2-bit codes (as Q2_K's), 12 bytes of 6-bit scales, d
        # (f16). Sub-block s of 16 values (lanes as Q2_K's): high bits, bit 4 * (s // 8) + (s % 8) // 2
        # of bytes lane; scale sc: low 4 bits nibble s // 8 of byte s % 8, high 2 bits field s // 4 of
        # byte 8 + s % 4. Values d * (sc - 32) * (code, less 4 where the high bit is clear).
        s = tl.arange(0, 16)[None, :, None]
        lane = 16 * (s % 2) + tl.arange(0, 16)[None, None, :]
        field = (s % 8) // 2
        b3, m3 = base[:, None, None], mask[:, None, None]
        q = (_u8_at(src + b3 + 32 + 32 * (s // 8) + lane, m3) >> (2 * field)) & 3
        high = (_u8_at(src + b3 + lane, m3) >> (4 * (s // 8) + field)) & 1
        sc = (_u8_at(src + b3 + 96 + s % 8, m3) >> (4 * (s // 8))) & 0xF
        sc |= ((_u8_at(src + b3 + 104 + s % 4, m3) >> (2 * (s // 4))) & 3) << 4
        d = _f16_at(src + base + 108, mask)[:, None, None]
        return d * (sc - 32).to(tl.float32) * (q - 4 + 4 * high).to(tl.float32)

    @triton.jit
    def _q4_k_blocks(src, base, mask, FIFTH_BITS: tl.constexpr):
        # d, dmin (f16), 12 bytes of 6-bit scales/mins, then (Q5_K only: 32 bytes of fifth bits, bit j
        # of byte `lane` for sub-block j) 128 bytes of nibbles: 4 chunks of 64 values, low nibbles
        # for the first 32 of a chunk (sub-block j = 2 * chunk), high nibbles for the next 32.
        j = tl.arange(0, 8)[None, :, None]
        lane = tl.arange(0, 32)[None, None, :]
        b3, m3 = base[:, None, None], mask[:, None, None]
        d = _f16_at(src + base, mask)[:, None, None]
        dmin = _f16_at(src + base + 2, mask)[:, None, None]
        sc, mn = _k_scale_min(src + base[:, None] + 4, tl.arange(0, 8)[None, :], mask[:, None])
        q = _u8_at(src + b3 + 16 + 32 * FIFTH_BITS + 32 * (j // 2) + lane, m3)
        q = tl.where(j % 2 == 1, q >> 4, q & 0xF)
        if FIFTH_BITS:
            q = q | (((_u8_at(src + b3 + 16 + lane, m3) >> j) & 1) << 4)
        return d * sc[:, :, None] * q.to(tl.float32) - dmin * mn[:, :, None]

    @triton.jit
    def _q6_k_blocks(src, base, mask):
        # 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, f16 d. Sub-block s of 16
        # values (scale s) lies in half h = s // 8, group g = (s // 2) % 4, at lanes 16 * (s % 2) + u:
        # low/high nibbles (g >= 2) of 32-byte run g % 2 of the half's 64 bytes, and 2-bit field g of
        # the half's 32 high bytes.
        s = tl.arange(0, 16)[None, :, None]
        lane = 16 * (s % 2) + tl.arange(0, 16)[None, None, :]
        h, g = s // 8, (s // 2) % 4
        b3, m3 = base[:, None, None], mask[:, None, None]
        low = _u8_at(src + b3 + 64 * h + 32 * (g % 2) + lane, m3)
        low = tl.where(g >= 2, low >> 4, low & 0xF)
        high = (_u8_at(src + b3 + 128 + 32 * h + lane, m3) >> (2 * g)) & 3
        q = ((low | (high << 4)) - 32).to(tl.float32)
        sc = tl.load(src + base[:, None] + 192 + tl.arange(0, 16)[None, :], mask=mask[:, None], other=0)
        d = _f16_at(src + base + 208, mask)[:, None, None]
        return d * sc.to(tl.int8, bitcast=True).to(tl.float32)[:, :, None] * q

    @triton.jit
    def _float_blocks(src, base, mask, ITEM: tl.constexpr, BF16: tl.constexpr):
        """Runs of 32 float32/float16/bfloat16 values (``ITEM`` bytes each) as blocks."""
        at = src + base[:, None] + ITEM * tl.arange(0, 32)[None, :]
        m = mask[:, None]
        if ITEM == 4:
            bits = _u8_at(at, m) | (_u8_at(at + 1, m) << 8) | (_u8_at(at + 2, m) << 16) | (_u8_at(at + 3, m) << 24)
            return bits.to(tl.float32, bitcast=True)
        if BF16:
            return ((_u8_at(at, m) | (_u8_at(at + 1, m) << 8)) << 16).to(tl.float32, bitcast=True)
        return _f16_at(at, m)

    @triton.jit
    def _iq4_xs_blocks(src, base, mask, tables):
        # d (f16), the 6-bit scales' high 2 bits (a 16-bit word, field j for sub-block j of 32 values)
        # and low 4 bits (nibble j % 2 of byte j // 2 of 4), 16 bytes of nibbles per sub-block (as
        # IQ4_NL's): d * (scale - 32) * v
        j = tl.arange(0, 8)[None, :, None]
        b3, m3 = base[:, None, None], mask[:, None, None]
        sc = (_u8_at(src + b3 + 4 + j // 2, m3) >> (4 * (j % 2))) & 0xF
        sc |= ((_u16_at(src + b3 + 2, m3) >> (2 * j)) & 3) << 4
        q = _nibbles(src + b3 + 8 + 16 * j, tl.arange(0, 32)[None, None, :], m3)
        d = _f16_at(src + base, mask)[:, None, None]
        return d * (sc - 32).to(tl.float32) * tl.load(tables + _IQ4_NL_VALUES + q).to(tl.float32)

    @triton.jit
    def _iq2_xxs_blocks(src, base, mask, tables):
        # d (f16), then 8 bytes per sub-block: 4 indices of iq2xxs_grid (8 values each), a 32-bit word
        # of signs and scale (_xxs_values). Entry e: sub-block e // 4, its entry e % 4.
        e = tl.arange(0, 32)[None, :, None]
        v = tl.arange(0, 8)[None, None, :]
        at, m3 = src + base[:, None, None] + 2 + 8 * (e // 4), mask[:, None, None]
        grid = tl.load(tables + _IQ2_XXS_GRID + 8 * _u8_at(at + e % 4, m3) + v).to(tl.float32)
        return _xxs_values(grid, _u32_at(at + 4, m3), e % 4, v, _f16_at(src + base, mask)[:, None, None], 0.25)

    @triton.jit
    def _iq3_xxs_blocks(src, base, mask, tables):
        # d (f16), 64 indices of iq3xxs_grid (4 values each, 8 per sub-block), then a 32-bit word of
        # signs and scale per sub-block (_xxs_values). Entry e: sub-block e // 8, its values
        # 4 (e % 8) + v, signs from field (e % 8) // 2.
        e = tl.arange(0, 64)[None, :, None]
        v = tl.arange(0, 4)[None, None, :]
        at, m3 = src + base[:, None, None], mask[:, None, None]
        grid = tl.load(tables + _IQ3_XXS_GRID + 4 * _u8_at(at + 2 + e, m3) + v).to(tl.float32)
        d = _f16_at(src + base, mask)[:, None, None]
        return _xxs_values(grid, _u32_at(at + 66 + 4 * (e // 8), m3), (e % 8) // 2, 4 * (e % 2) + v, d, 0.5)

    @triton.jit
    def _iq2_xs_blocks(src, base, mask, tables):
        # d (f16), a 16-bit word per entry of 8 values (4 per sub-block: a 9-bit index of iq2xs_grid,
        # a 7-bit ksigns entry above it), 8 bytes of scales (_iq2_scales; half (e % 4) // 2 of
        # sub-block e // 4 for entry e)
        e = tl.arange(0, 32)[None, :, None]
        v = tl.arange(0, 8)[None, None, :]
        at, m3 = src + base[:, None, None], mask[:, None, None]
        q = _u16_at(at + 2 + 2 * e, m3)
        grid = tl.load(tables + _IQ2_XS_GRID + 8 * (q & 511) + v).to(tl.float32)
        d = _f16_at(src + base, mask)[:, None, None]
        return _iq2_scales(at + 66 + e // 4, (e % 4) // 2, m3, d) * tl.where(_ksign(q >> 9, v), -grid, grid)

    @triton.jit
    def _iq2_s_blocks(src, base, mask, tables):
        # d (f16), the low 8 bits of 32 indices of iq2s_grid (an entry of 8 values each, 4 per
        # sub-block), 32 sign bytes (one per entry), 8 bytes of the indices' high 2 bits (field e % 4
        # of byte e // 4 for entry e), 8 bytes of scales (_iq2_scales, as IQ2_XS's)
        e = tl.arange(0, 32)[None, :, None]
        v = tl.arange(0, 8)[None, None, :]
        at, m3 = src + base[:, None, None], mask[:, None, None]
        index = _u8_at(at + 2 + e, m3) | (((_u8_at(at + 66 + e // 4, m3) >> (2 * (e % 4))) & 3) << 8)
        grid = tl.load(tables + _IQ2_S_GRID + 8 * index + v).to(tl.float32)
        minus = ((_u8_at(at + 34 + e, m3) >> v) & 1) == 1
        d = _f16_at(src + base, mask)[:, None, None]
        return _iq2_scales(at + 74 + e // 4, (e % 4) // 2, m3, d) * tl.where(minus, -grid, grid)

    @triton.jit
    def _iq3_s_blocks(src, base, mask, tables):
        # d (f16), the low 8 bits of 64 indices of iq3s_grid (an entry of 4 values each, 8 per
        # sub-block), 8 bytes of their 9th bits (bit e % 8 of byte e // 8 for entry e), 32 sign bytes
        # (nibble e % 2 of byte e // 2), 4 bytes of 4-bit scales s (nibble j % 2 of byte j // 2 for
        # sub-block j): d * (1 + 2 s)
        e = tl.arange(0, 64)[None, :, None]
        v = tl.arange(0, 4)[None, None, :]
        j = e // 8
        at, m3 = src + base[:, None, None], mask[:, None, None]
        index = _u8_at(at + 2 + e, m3) | (((_u8_at(at + 66 + j, m3) >> (e % 8)) & 1) << 8)
        grid = tl.load(tables + _IQ3_S_GRID + 4 * index + v).to(tl.float32)
        minus = ((_u8_at(at + 74 + e // 2, m3) >> (4 * (e % 2) + v)) & 1) == 1
        s = (_u8_at(at + 106 + j // 2, m3) >> (4 * (j % 2))) & 0xF
        d = _f16_at(src + base, mask)[:, None, None]
        return d * (1 + 2 * s).to(tl.float32) * tl.where(minus, -grid, grid)

    @triton.jit
    def _iq1_s_blocks(src, base, mask, tables):
        # d (f16), the low 8 bits of 32 indices of iq1s_grid (an entry of 8 values each, 4 per
        # sub-block), a 16-bit word per sub-block: the indices' high 3 bits (field e % 4 for entry e),
        # a 3-bit scale s (bits 12..14: d * (2 s + 1)), delta's sign (bit 15; _iq1_values)
        e = tl.arange(0, 32)[None, :, None]
        at, m3 = src + base[:, None, None], mask[:, None, None]
        qh = _u16_at(at + 34 + 2 * (e // 4), m3)
        index = _u8_at(at + 2 + e, m3) | (((qh >> (3 * (e % 4))) & 7) << 8)
        d = _f16_at(src + base, mask)[:, None, None]
        v = tl.arange(0, 8)[None, None, :]
        return d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32) * _iq1_values(tables, index, v, qh >= 0x8000)

    @triton.jit
    def _iq1_m_blocks(src, base, mask, tables):
        # The low 8 bits of 32 indices of iq1s_grid (an entry of 8 values each, 4 per sub-block), 16
        # bytes of a nibble per entry (e % 2 of byte e // 2: the index's high 3 bits, then delta's
        # sign: _iq1_values), four 16-bit words of 3-bit scales s (field 2 (j % 2) + h of word j // 2
        # for half h of sub-block j: d * (2 s + 1)), their top nibbles d's bits (f16, low first).
        e = tl.arange(0, 32)[None, :, None]
        j = e // 4
        at, m3 = src + base[:, None, None], mask[:, None, None]
        h = (_u8_at(at + 32 + e // 2, m3) >> (4 * (e % 2))) & 0xF
        index = _u8_at(at + e, m3) | ((h & 7) << 8)
        s = (_u16_at(at + 48 + 2 * (j // 2), m3) >> (6 * (j % 2) + 3 * ((e % 4) // 2))) & 7
        top = src + base + 49
        d = (_u8_at(top, mask) >> 4) | (_u8_at(top + 2, mask) & 0xF0) | ((_u8_at(top + 4, mask) & 0xF0) << 4) \
            | ((_u8_at(top + 6, mask) & 0xF0) << 8)
        d = d.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)[:, None, None]
        v = tl.arange(0, 8)[None, None, :]
        return d * (2 * s + 1).to(tl.float32) * _iq1_values(tables, index, v, h >= 8)

    @triton.jit
    def _blocks(src, base, mask, tables, TYPE: tl.constexpr):
        """The values of blocks of ggml type ``TYPE`` (a code of _TYPE_CODES)."""
        if TYPE == 0:
            return _q4_0_blocks(src, base, mask, False, False)
        elif TYPE == 1:
            return _q4_0_blocks(src, base, mask, False, True)
        elif TYPE == 2:
            return _q8_0_blocks(src, base, mask)
        elif TYPE == 3:
            return _q4_k_blocks(src, base, mask, False)
        elif TYPE == 4:
            return _q4_k_blocks(src, base, mask, True)
        elif TYPE == 5:
            return _q6_k_blocks(src, base, mask)
        elif TYPE == 6:
            return _float_blocks(src, base, mask, 4, False)
        elif TYPE == 7:
            return _float_blocks(src, base, mask, 2, False)
        elif TYPE == 8:
            return _float_blocks(src, base, mask, 2, True)
        elif TYPE == 9:
            return _q4_0_blocks(src, base, mask, True, False)
        elif TYPE == 10:
            return _q4_0_blocks(src, base, mask, True, True)
        elif TYPE == 11:
            return _q2_k_blocks(src, base, mask)
        elif TYPE == 12:
            return _q3_k_blocks(src, base, mask)
        elif TYPE == 13:
            return _iq4_nl_blocks(src, base, mask, tables)
        elif TYPE == 14:
            return _iq4_xs_blocks(src, base, mask, tables)
        elif TYPE == 15:
            return _mxfp4_blocks(src, base, mask, tables)
        elif TYPE == 16:
            return _iq2_xxs_blocks(src, base, mask, tables)
        elif TYPE == 17:
            return _iq2_xs_blocks(src, base, mask, tables)
        elif TYPE == 18:
            return _iq2_s_blocks(src, base, mask, tables)
        elif TYPE == 19:
            return _iq3_xxs_blocks(src, base, mask, tables)
        elif TYPE == 20:
            return _iq3_s_blocks(src, base, mask, tables)
        elif TYPE == 21:
            return _iq1_s_blocks(src, base, mask, tables)
        else:
            return _iq1_m_blocks(src, base, mask, tables)

    @triton.jit
    def _dequantize(src, tables, dst, n_blocks, expert_elems, dst_expert_stride, BLOCKS: tl.constexpr,
                    QK: tl.constexpr, BLOCK_BYTES: tl.constexpr, TYPE: tl.constexpr):
        block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        values = tl.reshape(_blocks(src, block * BLOCK_BYTES, mask, tables, TYPE), (BLOCKS, QK))
        flat = block[:, None] * QK + tl.arange(0, QK)[None, :]
        expert = flat // expert_elems
        dst_at = expert * dst_expert_stride + (flat - expert * expert_elems)
        tl.store(dst + dst_at, values.to(dst.dtype.element_ty), mask=mask[:, None])

    @triton.jit
    def _packed_tile_bytes(TYPE: tl.constexpr):
        """Bytes of a packed tile (16 rows, 256 columns) of the types whose d follow the group's tiles."""
        if TYPE == 12:
            return 1792  # Q3_K
        elif TYPE == 14:
            return 2176  # IQ4_XS
        elif TYPE == 16:
            return 1088  # IQ2_XXS
        elif TYPE == 17:
            return 1216  # IQ2_XS
        elif TYPE == 18:
            return 1280  # IQ2_S
        elif TYPE == 19:
            return 1600  # IQ3_XXS
        elif TYPE == 20:
            return 1728  # IQ3_S
        else:
            return 3328  # Q6_K

    @triton.jit
    def _packed_tile(src, tables, group, b, cols, row_mask, TYPE: tl.constexpr):
        """Values [16 rows, 256 columns] of tile b (columns 256 b on) of the row group at byte
        ``group`` of ``src``, in lvgg's packed layout of ``TYPE`` (vnni_kquants.h); columns past
        ``cols`` and rows outside ``row_mask`` ([16]) read as 0. ``tables``: _lookup_tables."""
        r = tl.arange(0, 16)[:, None]
        c = tl.arange(0, 256)[None, :]
        m = row_mask[:, None] & (256 * b + c < cols)
        w = c % 32  # column within a 32-column chunk (a K-quant's sub-block, or two)
        hi = w >= 16  # high nibble; the second 16-value sub-block of a chunk
        k = w // 4  # the kernels' register holding the column
        nib = ((w % 16) // 4 * 16 + r) * 4 + w % 4  # byte of w's nibble within the chunk's nibbles: load, row, byte
        plane = r * 4 + w % 4  # byte of w's bit within a bit plane (bit k)
        crumb = (k // 4) * 64 + plane  # byte of w's low 2 bits within the crumbs (bits 2 (k % 4))
        j = c // 32  # the chunk
        # Q6_K's, Q3_K's, IQ4_XS's and the IQ2/IQ3 types' d: [16] per tile, after the group's tiles
        d_after = group + (cols // 256) * _packed_tile_bytes(TYPE) + (b * 16 + r) * 2
        if TYPE == 3 or TYPE == 4:  # Q4_K, Q5_K: d[16], dmin[16], sc[8][16], m pairs[4][16][2], then per chunk
            tile = group + b * (2368 if TYPE == 3 else 2880)  # its nibbles (Q5_K: and the plane of fifth bits)
            d = _f16_at(src + tile + 2 * r, row_mask[:, None])
            dmin = _f16_at(src + tile + 32 + 2 * r, row_mask[:, None])
            sc = _u8_at(src + tile + 64 + j * 16 + r, m).to(tl.float32)
            mn = _u8_at(src + tile + 192 + ((j // 2) * 16 + r) * 2 + j % 2, m).to(tl.float32)
            chunk = tile + 320 + j * (256 if TYPE == 3 else 320)
            q = _u8_at(src + chunk + nib, m)
            q = tl.where(hi, q >> 4, q & 0xF)
            if TYPE == 4:
                q = q | (((_u8_at(src + chunk + 256 + plane, m) >> k) & 1) << 4)
            return d * sc * q.to(tl.float32) - dmin * mn
        elif TYPE == 5:  # Q6_K: runs of two 32-column chunks (scales of both, then qh, ql of each); d after the tiles
            tile = group + b * 3328
            run = tile + (j // 2) * 832
            sc = tl.load(src + run + 32 * (j % 2) + 2 * r + hi.to(tl.int32), mask=m, other=0).to(tl.int8, bitcast=True)
            chunk = run + 64 + 384 * (j % 2)
            low = _u8_at(src + chunk + 128 + nib, m)
            low = tl.where(hi, low >> 4, low & 0xF)
            i = (w % 16) // 4
            high = (_u8_at(src + chunk + ((i // 2) * 16 + r) * 4 + w % 4, m) >> (4 * (i % 2) + 2 * hi.to(tl.int32))) & 3
            d = _f16_at(src + d_after, row_mask[:, None])
            return d * sc.to(tl.float32) * ((low | (high << 4)) - 32).to(tl.float32)
        elif TYPE == 11:  # Q2_K: d[16], dmin[16], per chunk [16][2] scale | min << 4, then per chunk the crumbs
            tile = group + b * 1344
            sm = _u8_at(src + tile + 64 + j * 32 + 2 * r + hi.to(tl.int32), m)
            q = (_u8_at(src + tile + 320 + j * 128 + crumb, m) >> (2 * (k % 4))) & 3
            d = _f16_at(src + tile + 2 * r, row_mask[:, None])
            dmin = _f16_at(src + tile + 32 + 2 * r, row_mask[:, None])
            return d * (sm & 0xF).to(tl.float32) * q.to(tl.float32) - dmin * (sm >> 4).to(tl.float32)
        elif TYPE == 12:  # Q3_K: per chunk int8 scale pairs [16][2], then per chunk crumbs and third bits; d after
            tile = group + b * 1792
            sc = tl.load(src + tile + j * 32 + 2 * r + hi.to(tl.int32), mask=m, other=0).to(tl.int8, bitcast=True)
            chunk = tile + 256 + j * 192
            q = ((_u8_at(src + chunk + crumb, m) >> (2 * (k % 4))) & 3) | (((_u8_at(src + chunk + 128 + plane, m) >> k) & 1) << 2)
            d = _f16_at(src + d_after, row_mask[:, None])
            return d * sc.to(tl.float32) * (q - 4).to(tl.float32)
        elif TYPE >= 16 and TYPE <= 20:  # IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S (vnni_kquants.cpp's GridFormat)
            IQ3: tl.constexpr = TYPE >= 19
            SCALES16: tl.constexpr = TYPE == 17 or TYPE == 18
            HIGH_BITS: tl.constexpr = 0 if TYPE == 16 or TYPE == 19 else (2 if TYPE == 18 else 1)
            RUN_BYTES: tl.constexpr = 8 * (2 if IQ3 else 1)  # per chunk: a 64-bit mask per run (and high bit)
            tile = group + b * _packed_tile_bytes(TYPE)
            high = tile + (128 if SCALES16 else 64) + j * RUN_BYTES * HIGH_BITS
            chunk = tile + (128 if SCALES16 else 64) + 8 * RUN_BYTES * HIGH_BITS + j * (192 if IQ3 else 128)
            if SCALES16:  # a byte per row and chunk: sub-block 2j's s, then 2j + 1's
                s = (_u8_at(src + tile + 16 * j + r, m) >> (4 * hi.to(tl.int32))) & 0xF
            else:  # a byte per row and chunk pair: chunk 2p's s, then 2p + 1's
                s = (_u8_at(src + tile + 16 * (j // 2) + r, m) >> (4 * (j % 2))) & 0xF
            # runs of 64 indices (IQ3: 16 columns each, entries of 4 values; IQ2: 32, of 8): row r's
            # entry i at byte 4 r + i, its bits above the low byte and its values' signs in 64-bit masks
            u = w // 16 if IQ3 else 0
            i = (w % 16) // 4 if IQ3 else w // 8
            v = w % 4 if IQ3 else w % 8
            at = 4 * r + i
            index = _u8_at(src + chunk + 64 * u + at, m)
            for bit in tl.static_range(HIGH_BITS):
                mask = src + high + 8 * (u * HIGH_BITS + bit)
                index = index | (((_u8_at(mask + at // 8, m) >> (at % 8)) & 1) << (8 + bit))
            if IQ3:
                grid = tl.load(tables + (_IQ3_XXS_GRID if TYPE == 19 else _IQ3_S_GRID) + 4 * index + v, mask=m, other=0)
            else:
                base = _IQ2_XXS_GRID if TYPE == 16 else (_IQ2_XS_GRID if TYPE == 17 else _IQ2_S_GRID)
                grid = tl.load(tables + base + 8 * index + v, mask=m, other=0)
            signs = chunk + (128 if IQ3 else 64) + 8 * (u * (4 if IQ3 else 8) + v)
            minus = ((_u8_at(src + signs + at // 8, m) >> (at % 8)) & 1) == 1
            factor = 1.0 if TYPE == 20 else (0.25 if TYPE == 19 else 0.125)
            d = _f16_at(src + d_after, row_mask[:, None])
            grid = grid.to(tl.float32)
            return d * factor * (2 * s + 1).to(tl.float32) * tl.where(minus, -grid, grid)
        elif TYPE == 14:  # IQ4_XS: sc[8][16] (int8), then per chunk the nibbles of its codes; d after the tiles
            tile = group + b * 2176
            sc = tl.load(src + tile + j * 16 + r, mask=m, other=0).to(tl.int8, bitcast=True)
            q = _u8_at(src + tile + 128 + j * 256 + nib, m)
            q = tl.where(hi, q >> 4, q & 0xF)
            d = _f16_at(src + d_after, row_mask[:, None])
            return d * sc.to(tl.float32) * tl.load(tables + _IQ4_NL_VALUES + q).to(tl.float32)
        else:  # Q8_0, Q4_0, IQ4_NL (pairs of blocks), MXFP4 (fours): the blocks' scales, then the weights of each
            units = j // 4 if TYPE == 15 else j // 2
            u = j % 4 if TYPE == 15 else j % 2
            unit = group + b * (4352 if TYPE == 2 else (2176 if TYPE == 15 else 2304)) + units * (
                1088 if TYPE == 2 or TYPE == 15 else 576)
            if TYPE == 2:
                q = _u8_at(src + unit + 64 + u * 512 + (w // 4 * 16 + r) * 4 + w % 4, m) - 128
                return _f16_at(src + unit + 32 * u + 2 * r, m) * q.to(tl.float32)
            q = _u8_at(src + unit + 64 + u * 256 + nib, m)
            q = tl.where(hi, q >> 4, q & 0xF)
            if TYPE == 15:  # e8m0, as _mxfp4_blocks
                e = _u8_at(src + unit + 16 * u + r, m)
                scale = tl.where(e < 2, 0x200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
                return scale * tl.load(tables + _MXFP4_VALUES + q).to(tl.float32)
            d = _f16_at(src + unit + 32 * u + 2 * r, m)
            if TYPE == 13:
                return d * tl.load(tables + _IQ4_NL_VALUES + q).to(tl.float32)
            return d * (q - 8).to(tl.float32)

    @triton.jit
    def _dequantize_packed(src, tables, dst, groups, cols, dst_expert_stride, expert_bytes, group_bytes,
                           TYPE: tl.constexpr):
        # program (expert e's row group g, tile b): its 16 x 256 values
        unit = tl.program_id(0).to(tl.int64)
        e, g = unit // groups, unit % groups
        b = tl.program_id(1)
        values = _packed_tile(src, tables, e * expert_bytes + g * group_bytes, b, cols, tl.full([16], 1, tl.int1), TYPE)
        r = tl.arange(0, 16)[:, None]
        c = 256 * b + tl.arange(0, 256)[None, :]
        tl.store(dst + e * dst_expert_stride + (16 * g + r) * cols + c, values.to(dst.dtype.element_ty),
                 mask=(c < cols) & (r >= 0))

    @triton.jit
    def _row_dots(src, tables, row_at, row_mask, col, x, cols, R: tl.constexpr, CHUNK: tl.constexpr,
                  TYPE: tl.constexpr, QK: tl.constexpr, BLOCK_BYTES: tl.constexpr):
        """[R] dot products of ``x`` ([CHUNK] float32: columns col..col+CHUNK-1, zero past ``cols``)
        with the same columns of R rows, whose bytes start at ``row_at`` ([R] int64) in ``src``."""
        b = tl.arange(0, CHUNK // QK)
        base = row_at[:, None] + (col // QK + b)[None, :] * BLOCK_BYTES
        mask = row_mask[:, None] & (col + b * QK < cols)[None, :]
        n: tl.constexpr = R * (CHUNK // QK)
        values = _blocks(src, tl.reshape(base, (n,)), tl.reshape(mask, (n,)), tables, TYPE)
        return tl.sum(tl.reshape(values, (R, CHUNK)) * x[None, :], axis=1)

    @triton.jit
    def _dots(src, tables, at, row_mask, col, x, cols, R: tl.constexpr, CHUNK: tl.constexpr, TYPE: tl.constexpr,
              QK: tl.constexpr, BB: tl.constexpr, PACKED: tl.constexpr):
        """``_row_dots`` of R rows starting at byte ``at`` (their row group, R = 16 and CHUNK = 256,
        when ``PACKED``; else each row's: ``at`` [R]) of ``src``."""
        if PACKED:
            return tl.sum(_packed_tile(src, tables, at, col // CHUNK, cols, row_mask, TYPE) * x[None, :], axis=1)
        else:
            return _row_dots(src, tables, at, row_mask, col, x, cols, R, CHUNK, TYPE, QK, BB)

    @triton.jit
    def _gated_activations(x, gate, up, tables, act, slot_expert, slots_per_token, staged, hidden, inter,
                           gate_slot_bytes, up_slot_bytes, gate_first, up_first, gate_line_bytes, up_line_bytes,
                           R: tl.constexpr, CHUNK: tl.constexpr, TYPE_G: tl.constexpr, QK_G: tl.constexpr,
                           BB_G: tl.constexpr, TYPE_U: tl.constexpr, QK_U: tl.constexpr, BB_U: tl.constexpr,
                           PACKED: tl.constexpr):
        # program (slot s, rows block): act[s, rows] = silu(gate_e(x_t)) * up_e(x_t),
        # t = s // slots_per_token, e = slot_expert[s]; nothing where e < 0
        s = tl.program_id(0).to(tl.int64)
        e = tl.load(slot_expert + s)
        used = e >= 0
        rows = tl.program_id(1) * R + tl.arange(0, R)
        row_mask = (rows < inter) & (tl.broadcast_to(e, [R]) >= 0)  # (`& used`: a mask the interpreter rejects)
        e = tl.minimum(e, staged - 1).to(tl.int64)
        lines = tl.program_id(1).to(tl.int64) if PACKED else rows.to(tl.int64)  # the rows' group, or each row
        gate_at = e * gate_slot_bytes + gate_first + lines * gate_line_bytes
        up_at = e * up_slot_bytes + up_first + lines * up_line_bytes
        xt = x + (s // slots_per_token) * hidden
        g = tl.zeros([R], dtype=tl.float32)
        u = tl.zeros([R], dtype=tl.float32)
        for col in range(0, hidden * used.to(tl.int32), CHUNK):
            cols = col + tl.arange(0, CHUNK)
            xv = tl.load(xt + cols, mask=cols < hidden, other=0).to(tl.float32)
            g += _dots(gate, tables, gate_at, row_mask, col, xv, hidden, R, CHUNK, TYPE_G, QK_G, BB_G, PACKED)
            u += _dots(up, tables, up_at, row_mask, col, xv, hidden, R, CHUNK, TYPE_U, QK_U, BB_U, PACKED)
        tl.store(act + s * inter + rows, g / (1 + tl.exp(-g)) * u, mask=row_mask)

    @triton.jit
    def _weighted_down(act, down, tables, weights, slot_expert, out, slots_per_token, staged, hidden, inter,
                       act_cols, lead, slot_bytes, line_bytes, R: tl.constexpr, CHUNK: tl.constexpr,
                       TYPE: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr, PACKED: tl.constexpr):
        # program (token t, rows block): out[t, rows] = sum over t's slots s with an expert e =
        # slot_expert[s] >= 0 of weights[s] * down_e(act[s]), act[s] at down's columns [lead, lead + act_cols)
        t = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * R + tl.arange(0, R)
        lines = tl.program_id(1).to(tl.int64) if PACKED else rows.to(tl.int64)
        total = tl.zeros([R], dtype=tl.float32)
        for j in range(0, slots_per_token):
            s = t * slots_per_token + j
            e = tl.load(slot_expert + s)
            used = e >= 0
            row_mask = (rows < hidden) & (tl.broadcast_to(e, [R]) >= 0)
            row_at = tl.minimum(e, staged - 1).to(tl.int64) * slot_bytes + lines * line_bytes
            part = tl.zeros([R], dtype=tl.float32)
            for col in range(0, inter * used.to(tl.int32), CHUNK):
                cols = col + tl.arange(0, CHUNK)
                a = tl.load(act + s * act_cols + cols - lead, mask=(cols >= lead) & (cols < lead + act_cols), other=0)
                part += _dots(down, tables, row_at, row_mask, col, a, inter, R, CHUNK, TYPE, QK, BB, PACKED)
            total += tl.where(used, tl.load(weights + s).to(tl.float32), 0.0) * part
        tl.store(out + t * hidden + rows, total.to(out.dtype.element_ty), mask=rows < hidden)

    @triton.jit
    def _split_routing(ids, real_rows, cpu_ids, gpu_experts, slot_expert, counts, counts_mirror, n_rows, top_k,
                       gpu_slots, most, held_start, held_stop, COUNTED: tl.constexpr, COUNT_FETCHES: tl.constexpr,
                       MIRROR: tl.constexpr, SLOTS: tl.constexpr, MOST: tl.constexpr):
        # one program over all n * k slots; [i, j] matrices compare slot i with slot j
        n_real = n_rows
        if COUNTED:
            r = tl.load(real_rows)
            n_real = tl.where((r >= 0) & (r < n_rows), r, n_rows)
        i = tl.arange(0, SLOTS)
        in_range = i < n_rows * top_k
        v = tl.load(ids + i, mask=i < n_real * top_k, other=-1).to(tl.int32)
        valid = in_range & (v >= held_start) & (v < held_stop)
        same = (v[:, None] == v[None, :]) & valid[:, None] & valid[None, :]
        first_at = tl.min(tl.where(same, i[None, :], SLOTS), axis=1)  # the slot where i's expert first appears
        first = valid & (first_at == i)
        # an expert's number among the distinct ones: first appearances before its own
        rank = tl.sum((first[None, :] & (i[None, :] < first_at[:, None])).to(tl.int32), axis=1)
        d = tl.sum(first.to(tl.int32), axis=0)
        m = tl.minimum((2 * d * gpu_slots + top_k) // (2 * top_k), most)
        local = rank - (d - m)
        on_gpu = valid & (local >= 0)
        tl.store(slot_expert + i, tl.where(on_gpu, local, -1), mask=in_range)
        tl.store(cpu_ids + i, tl.where(valid & ~on_gpu, v, -1), mask=in_range)
        j = tl.arange(0, MOST)
        hit = (first & on_gpu)[None, :] & (local[None, :] == j[:, None])  # [GPU expert j, slot]
        tl.store(gpu_experts + j, tl.max(tl.where(hit, v[None, :], -1), axis=1), mask=j < most)
        if COUNT_FETCHES:  # the one program: no other writer
            total = tl.load(counts) + m.to(tl.int64)
            tl.store(counts, total)
            if MIRROR:
                tl.store(counts_mirror, total)

    @triton.jit
    def _gather_rows(src, ids, dst, first, n_rows, src_row, src_line, dst_row, dst_line, size, line,
                     CHUNK: tl.constexpr):
        j = tl.program_id(0)
        row = tl.minimum(tl.load(ids + j).to(tl.int64) - first, n_rows - 1)
        at = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)  # in the row's lines, end to end
        mask = (at < size) & (tl.broadcast_to(row, [CHUNK]) >= 0)
        i, k = at // line, at % line
        value = tl.load(src + row * src_row + i * src_line + k, mask=mask)
        tl.store(dst + j.to(tl.int64) * dst_row + i * dst_line + k, value, mask=mask)
