"""GGML expert tensors dequantized on the GPU by Triton kernels.

    w = torch.empty(n_experts, rows, cols, dtype=torch.bfloat16, device="cuda")
    dequantize(raw, "Q4_K", w)          # raw: the tensor's GGUF bytes (uint8) on the same device

One program turns a few quant blocks into their values: every value gathers its block's
scales and its bits (all from L1), so the kernels run near the GPU's memory bandwidth. The
layouts are ggml's (ggml-common.h); tests check every type against gguf-py's dequantization.
The output may be a strided view with one stride per expert (e.g. the gate or up half of
vLLM's fused w13 buffer); rows and columns must be contiguous.
"""
from __future__ import annotations

import torch

try:  # Triton comes with CUDA builds of torch; CPU-only installs run the experts on the CPU only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# type -> (values per block, bytes per block)
QUANT_BLOCKS = {"Q4_0": (32, 18), "Q5_0": (32, 22), "Q8_0": (32, 34),
                "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
SUPPORTED_TYPES = frozenset(FLOAT_TYPES) | frozenset(QUANT_BLOCKS)


def raw_nbytes(ggml_type: str, n_values: int) -> int:
    """Bytes that ``n_values`` values of ``ggml_type`` (a name, either case) take in a GGUF file."""
    ggml_type = ggml_type.upper()
    if ggml_type in FLOAT_TYPES:
        return n_values * FLOAT_TYPES[ggml_type].itemsize
    qk, size = QUANT_BLOCKS[ggml_type]
    return n_values // qk * size


def dequantize(raw: torch.Tensor, ggml_type: str, out: torch.Tensor) -> torch.Tensor:
    """Write the values of ``raw`` (uint8, the GGUF bytes of an [E, rows, cols] tensor) into
    ``out`` ([E, rows, cols], float32/float16/bfloat16, rows and columns contiguous)."""
    ggml_type = ggml_type.upper()
    if ggml_type not in SUPPORTED_TYPES:
        raise ValueError(f"no GPU dequantization for {ggml_type}; supported: {sorted(SUPPORTED_TYPES)}")
    if out.dim() != 3 or out.stride(2) != 1 or out.stride(1) != out.shape[2]:
        raise ValueError(f"out must be [experts, rows, cols] with contiguous rows, found shape {list(out.shape)} "
                         f"strides {list(out.stride())}")
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out must be float32, float16 or bfloat16, found {out.dtype}")
    n_experts, rows, cols = out.shape
    qk, block_bytes = QUANT_BLOCKS.get(ggml_type, (1, 0))
    if cols % qk:
        raise ValueError(f"{ggml_type} rows hold whole blocks of {qk} values; found {cols} columns")
    expected = raw_nbytes(ggml_type, n_experts * rows * cols)
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != expected or raw.device != out.device:
        raise ValueError(f"raw must be {expected} uint8 bytes on {out.device} ({ggml_type}, {n_experts}x{rows}x{cols}); "
                         f"found {raw.numel()} {raw.dtype} on {raw.device}")
    if ggml_type in FLOAT_TYPES:
        out.copy_(raw.view(FLOAT_TYPES[ggml_type]).view(n_experts, rows, cols))
        return out
    if triton is None:
        raise RuntimeError("GPU dequantization needs Triton (it comes with CUDA builds of torch)")
    n_blocks = n_experts * rows * cols // qk
    blocks_per_program = 4096 // qk
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    _KERNELS[ggml_type][grid](raw, out, n_blocks, rows * cols, out.stride(0), BLOCKS=blocks_per_program, QK=qk,
                              BLOCK_BYTES=block_bytes)
    return out


def gather_rows(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[j] = src[ids[j]]`` by a kernel on ``out``'s device, in the current stream's order.

    src: [rows, n] uint8, e.g. one projection's bytes with a row per expert; it may be host
    memory registered with CUDA (the GPU then reads it over the link: no host code runs, so a
    CUDA graph can capture the call). ids: [m] int32/int64 on ``out``'s device, read by the
    kernel: values outside 0..rows-1 are clamped (they are never checked on the host, which
    would synchronize). out: [m, n] uint8, contiguous.
    """
    if src.dtype != torch.uint8 or src.dim() != 2 or src.stride(1) != 1 or src.stride(0) != src.shape[1]:
        raise ValueError(f"src must be contiguous [rows, bytes] uint8, found {src.dtype} {list(src.shape)}")
    m = ids.numel()
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or ids.device != out.device:
        raise ValueError(f"ids must be a 1-d int32/int64 tensor on {out.device}, found {ids.dtype} "
                         f"{list(ids.shape)} on {ids.device}")
    if out.dtype != torch.uint8 or tuple(out.shape) != (m, src.shape[1]) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [{m}, {src.shape[1]}] uint8, found {out.dtype} {list(out.shape)}")
    if triton is None:
        raise RuntimeError("gathering expert bytes needs Triton (it comes with CUDA builds of torch)")
    if m == 0:
        return out
    words = src.shape[1] % 4 == 0 and src.data_ptr() % 4 == 0 and out.data_ptr() % 4 == 0
    s, o = (src.view(torch.int32), out.view(torch.int32)) if words else (src, out)
    chunk = 2048
    _gather_rows[(m, triton.cdiv(s.shape[1], chunk))](s, ids, o, s.shape[0], s.shape[1], CHUNK=chunk)
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
    def _k_scale_min(scales, j, mask):
        """Sub-block j's 6-bit scale and min from a K-quant block's 12 packed bytes."""
        low = j < 4
        a = _u8_at(scales + j + 4, mask)
        b = _u8_at(scales + tl.where(low, j, j - 4), mask)
        c = _u8_at(scales + j, mask)
        sc = tl.where(low, b & 63, (a & 0xF) | ((b >> 6) << 4))
        m = tl.where(low, a & 63, (a >> 4) | ((c >> 6) << 4))
        return sc.to(tl.float32), m.to(tl.float32)

    @triton.jit
    def _prologue(pid, n_blocks, expert_elems, dst_expert_stride, BLOCKS: tl.constexpr, QK: tl.constexpr,
                  BLOCK_BYTES: tl.constexpr):
        """Per value: its index in the block, its block's first byte offset, the mask and the output offset."""
        idx = tl.arange(0, BLOCKS * QK)
        block = pid.to(tl.int64) * BLOCKS + idx // QK
        i = idx % QK
        mask = block < n_blocks
        flat = block * QK + i
        expert = flat // expert_elems
        dst = expert * dst_expert_stride + (flat - expert * expert_elems)
        return i, block * BLOCK_BYTES, mask, dst

    @triton.jit
    def _q4_0(src, dst, n_blocks, expert_elems, dst_expert_stride, BLOCKS: tl.constexpr, QK: tl.constexpr,
              BLOCK_BYTES: tl.constexpr):
        i, base, mask, o = _prologue(tl.program_id(0), n_blocks, expert_elems, dst_expert_stride, BLOCKS, QK,
                                     BLOCK_BYTES)
        d = _f16_at(src + base, mask)
        q = _u8_at(src + base + 2 + i % 16, mask)
        q = tl.where(i < 16, q & 0xF, q >> 4) - 8
        tl.store(dst + o, (d * q.to(tl.float32)).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _q5_0(src, dst, n_blocks, expert_elems, dst_expert_stride, BLOCKS: tl.constexpr, QK: tl.constexpr,
              BLOCK_BYTES: tl.constexpr):
        i, base, mask, o = _prologue(tl.program_id(0), n_blocks, expert_elems, dst_expert_stride, BLOCKS, QK,
                                     BLOCK_BYTES)
        d = _f16_at(src + base, mask)
        high = (_u8_at(src + base + 2 + i // 8, mask) >> (i % 8)) & 1
        q = _u8_at(src + base + 6 + i % 16, mask)
        q = (tl.where(i < 16, q & 0xF, q >> 4) | (high << 4)) - 16
        tl.store(dst + o, (d * q.to(tl.float32)).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _q8_0(src, dst, n_blocks, expert_elems, dst_expert_stride, BLOCKS: tl.constexpr, QK: tl.constexpr,
              BLOCK_BYTES: tl.constexpr):
        i, base, mask, o = _prologue(tl.program_id(0), n_blocks, expert_elems, dst_expert_stride, BLOCKS, QK,
                                     BLOCK_BYTES)
        d = _f16_at(src + base, mask)
        q = tl.load(src + base + 2 + i, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        tl.store(dst + o, (d * q).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _q4_k(src, dst, n_blocks, expert_elems, dst_expert_stride, BLOCKS: tl.constexpr, QK: tl.constexpr,
              BLOCK_BYTES: tl.constexpr):
        # d, dmin (f16), 12 bytes of 6-bit scales/mins, then (Q5_K only: 32 bytes of fifth bits, bit j
        # of byte `lane` for sub-block j) 128 bytes of nibbles: 4 chunks of 64 values, low nibbles
        # for the first 32 of a chunk, high nibbles for the next 32. Q5_K is told by its block size.
        i, base, mask, o = _prologue(tl.program_id(0), n_blocks, expert_elems, dst_expert_stride, BLOCKS, QK,
                                     BLOCK_BYTES)
        d = _f16_at(src + base, mask)
        dmin = _f16_at(src + base + 2, mask)
        chunk, half, lane = i // 64, (i // 32) % 2, i % 32
        j = 2 * chunk + half
        sc, m = _k_scale_min(src + base + 4, j, mask)
        if BLOCK_BYTES == 176:  # Q5_K
            q = _u8_at(src + base + 48 + 32 * chunk + lane, mask)
        else:
            q = _u8_at(src + base + 16 + 32 * chunk + lane, mask)
        q = tl.where(half == 1, q >> 4, q & 0xF)
        if BLOCK_BYTES == 176:
            q = q | (((_u8_at(src + base + 16 + lane, mask) >> j) & 1) << 4)
        tl.store(dst + o, (d * sc * q.to(tl.float32) - dmin * m).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _q6_k(src, dst, n_blocks, expert_elems, dst_expert_stride, BLOCKS: tl.constexpr, QK: tl.constexpr,
              BLOCK_BYTES: tl.constexpr):
        # 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16 values), f16 d.
        # Two halves of 128 values; in each, four groups of 32 take low/high nibbles of two 32-byte
        # runs and 2-bit fields 0..3 of the same 32 high bytes.
        i, base, mask, o = _prologue(tl.program_id(0), n_blocks, expert_elems, dst_expert_stride, BLOCKS, QK,
                                     BLOCK_BYTES)
        d = _f16_at(src + base + 208, mask)
        half, group, lane = i // 128, (i // 32) % 4, i % 32
        low = _u8_at(src + base + 64 * half + 32 * (group % 2) + lane, mask)
        low = tl.where(group >= 2, low >> 4, low & 0xF)
        high = (_u8_at(src + base + 128 + 32 * half + lane, mask) >> (2 * group)) & 3
        q = ((low | (high << 4)) - 32).to(tl.float32)
        sc = tl.load(src + base + 192 + 8 * half + lane // 16 + 2 * group, mask=mask, other=0)
        sc = sc.to(tl.int8, bitcast=True).to(tl.float32)
        tl.store(dst + o, (d * sc * q).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_rows(src, ids, dst, n_rows, row_len, CHUNK: tl.constexpr):
        j = tl.program_id(0)
        row = tl.minimum(tl.maximum(tl.load(ids + j).to(tl.int64), 0), n_rows - 1)
        at = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        mask = at < row_len
        tl.store(dst + j.to(tl.int64) * row_len + at, tl.load(src + row * row_len + at, mask=mask), mask=mask)

    _KERNELS = {"Q4_0": _q4_0, "Q5_0": _q5_0, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q4_k, "Q6_K": _q6_k}
