"""lvgg's Triton dequantization kernels against gguf-py's decoding of the same bytes.

On a machine with an NVIDIA GPU the kernels run there; elsewhere the same checks run in a
child process under Triton's interpreter (TRITON_INTERPRET=1, which must be set before any
kernel is defined), so CI executes every kernel line without a GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from lvgg import _bridge
from lvgg.gpu.dequant import (FLOAT_TYPES, QUANT_BLOCKS, StagedProjection, _lookup_tables, dequantize,
                              gated_activations, gather_rows, packed_nbytes, raw_nbytes, split_routing, weighted_down)
from lvgg.quantize import quantize

# Byte offsets of each block's float16 scales; every other byte may hold any value but MXFP4's
# exponent (byte 0) and IQ1_M's float16 scale (the high nibbles of bytes 49, 51, 53, 55), which
# random_blocks keeps finite too.
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                 "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
                 "MXFP4": [], "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0], "IQ3_XXS": [0], "IQ3_S": [0],
                 "IQ1_S": [0], "IQ1_M": []}
# types whose ggml quantizer needs an importance matrix (ggml_quantize_requires_imatrix; IQ1_S too)
IMATRIX_TYPES = {"IQ2_XXS", "IQ2_XS"}
# types checked on random blocks only: ggml's IQ1 quantizer first builds a search table (13 s on 2 cores)
RANDOM_ONLY = {"IQ1_S", "IQ1_M"}
TYPES = sorted(QUANT_BLOCKS) + sorted(FLOAT_TYPES)
CHECKS = TYPES + ["packed", "gather", "experts", "split"]
# expert kernel cases: (gate/up type, down type, tokens, experts per token, hidden, intermediate, gate+up fused,
# x and output dtype)
EXPERT_CASES = [("Q4_K", "Q6_K", 2, 3, 512, 256, False, torch.bfloat16),  # llama.cpp's Q4_K_M
                ("Q8_0", "Q4_0", 1, 2, 544, 288, False, torch.float32),  # rows and columns past whole tiles
                ("Q5_K", "Q5_0", 1, 1, 256, 256, True, torch.bfloat16),
                ("BF16", "F16", 2, 1, 96, 64, False, torch.float32),
                ("F32", "Q8_0", 1, 2, 64, 64, True, torch.float16),
                # a tensor-parallel share's rows [40, 216) of down's whole Q6_K block of 256 columns
                ("Q4_K", "Q6_K", 2, 2, 256, 256, False, torch.float32, 40, 176),
                # the other types of community GGUF files, gate/up and down of different types
                ("IQ2_XXS", "Q3_K", 1, 2, 256, 256, False, torch.float32),
                ("IQ4_XS", "MXFP4", 1, 2, 256, 96, True, torch.bfloat16),
                ("Q2_K", "IQ3_S", 2, 1, 256, 256, False, torch.float32),
                ("IQ1_M", "Q4_1", 1, 2, 256, 64, False, torch.float32),
                ("IQ2_XS", "IQ2_S", 1, 1, 256, 256, True, torch.float16),
                ("IQ3_XXS", "IQ1_S", 1, 1, 256, 256, False, torch.float32),
                ("IQ4_NL", "Q5_1", 1, 1, 96, 64, False, torch.float32)]
# the same kernels on lvgg's packed CPU layout (the CPU engine's copy): whole groups of 16 rows
PACKED_EXPERT_CASES = [("Q4_K", "Q6_K", 2, 3, 512, 256, True, torch.bfloat16),
                       ("Q8_0", "Q4_0", 1, 2, 544, 288, False, torch.float32),
                       ("Q6_K", "Q8_0", 3, 2, 256, 160, True, torch.float32),
                       ("IQ4_XS", "Q5_K", 2, 2, 512, 256, False, torch.bfloat16),
                       ("Q3_K", "MXFP4", 1, 2, 256, 352, True, torch.float32),  # MXFP4 rows end inside a tile
                       ("Q2_K", "IQ4_NL", 2, 1, 256, 160, False, torch.float32),
                       ("IQ2_XXS", "IQ3_S", 2, 2, 256, 256, True, torch.float32),
                       ("IQ3_XXS", "IQ2_XS", 1, 2, 512, 256, False, torch.bfloat16),
                       ("IQ2_S", "IQ2_S", 1, 1, 256, 256, False, torch.float32)]
# packed dequantization cases: (type, experts, rows, columns); rows of 32-value blocks ending inside a tile
PACKED_CASES = [("Q4_K", 2, 32, 512), ("Q6_K", 2, 48, 768), ("Q8_0", 3, 16, 544), ("Q4_0", 2, 32, 608),
                ("Q5_K", 2, 32, 512), ("Q3_K", 2, 16, 768), ("Q2_K", 2, 32, 512), ("IQ4_XS", 2, 16, 768),
                ("IQ4_NL", 2, 32, 608), ("MXFP4", 2, 16, 2880), ("MXFP4", 1, 16, 352), ("IQ2_XXS", 2, 16, 512),
                ("IQ2_XS", 2, 32, 512), ("IQ2_S", 1, 16, 768), ("IQ3_XXS", 2, 16, 512), ("IQ3_S", 2, 32, 768)]


def pack(raw: np.ndarray, ggml_type: str, rows: int, cols: int) -> np.ndarray:
    """[n, bytes] uint8: n [rows, cols] matrices of the file's bytes (``raw``) in lvgg's packed layout,
    by the CPU engine's own packer."""
    raw = np.ascontiguousarray(raw.reshape(-1, raw_nbytes(ggml_type, rows * cols)))
    out = np.empty((raw.shape[0], packed_nbytes(ggml_type, rows, cols)), dtype=np.uint8)
    _bridge.pack(_bridge.type_from_name(ggml_type), rows, cols, raw, out)
    return out


def ggml_quantized(w: np.ndarray, ggml_type: str) -> np.ndarray:
    """ggml's quantization of float32 rows ``w`` (with their mean squares as the importance matrix
    where the type needs one)."""
    return quantize(w, Q[ggml_type], 1, imatrix=(w * w).mean(axis=0) if ggml_type in IMATRIX_TYPES else None)


def random_blocks(rng: np.random.Generator, ggml_type: str, n_values: int) -> np.ndarray:
    """Bytes of `n_values` values of `ggml_type`: every bit pattern, finite scales."""
    if ggml_type in FLOAT_TYPES:
        values = rng.standard_normal(n_values).astype(np.float32)
        if ggml_type == "BF16":
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return values.astype(np.float16 if ggml_type == "F16" else np.float32).view(np.uint8)
    qk, size = QUANT_BLOCKS[ggml_type]
    n = n_values // qk
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[ggml_type]:
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, n).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if ggml_type == "MXFP4":  # e8m0 exponents e: values up to 12 * 2^(e - 128), finite for e < 253
        raw[:, 0] = rng.integers(0, 253, n)
    if ggml_type == "IQ1_M":  # the float16 scale's 4 nibbles, low first
        d = rng.uniform(-0.05, 0.05, n).astype(np.float16).view(np.uint16)
        for k in range(4):
            raw[:, 49 + 2 * k] = (raw[:, 49 + 2 * k] & 0xF) | ((d >> 4 * k) & 0xF).astype(np.uint8) << 4
    return raw.reshape(-1)


def check_type(ggml_type: str, device: str) -> None:
    rng = np.random.default_rng(sum(map(ord, ggml_type)))
    qk = QUANT_BLOCKS.get(ggml_type, (32, 0))[0]
    experts, rows, cols = 3, 5, 2 * qk
    raw = random_blocks(rng, ggml_type, experts * rows * cols)
    cases = [("random bytes", raw)]
    if ggml_type in QUANT_BLOCKS and ggml_type not in RANDOM_ONLY:  # and what ggml's quantizer writes
        w = rng.standard_normal((experts * rows, cols)).astype(np.float32)
        cases.append(("ggml-quantized", ggml_quantized(w, ggml_type).reshape(-1)))
    for case, raw in cases:
        want = gguf_dequantize(raw.reshape(experts * rows, -1), Q[ggml_type]).reshape(experts, rows, cols)
        for dtype in (torch.float32, torch.bfloat16):
            # a strided destination (one stride per expert) with poisoned rows around it
            out = torch.full((experts, rows + 2, cols), float("nan"), dtype=dtype, device=device)
            dequantize(torch.from_numpy(raw.copy()).to(device), ggml_type, out[:, 1:rows + 1])
            got = out[:, 1:rows + 1].float().cpu().numpy()
            expect = want.astype(np.float32)
            # float32: exact. bfloat16: the float32 value rounded (the interpreter truncates: one unit
            # in the last place, 2^-7 relative at most; and flushes subnormals, MXFP4's smallest, to 0).
            ok = np.array_equal(got, expect) if dtype == torch.float32 else \
                np.all(np.abs(got - expect) <= np.maximum(np.abs(expect) * 2.0**-7, 2.0**-126))
            assert ok, f"{ggml_type} {case} {dtype}: max diff {np.nanmax(np.abs(got - expect))}"
            assert torch.isnan(out[:, 0]).all() and torch.isnan(out[:, -1]).all(), f"{ggml_type}: wrote outside out"


def check_packed(device: str) -> None:
    """Dequantization of lvgg's packed layout gives the values of the file's bytes it was packed
    from (random bit patterns and ggml-quantized data), exactly in float32."""
    for ggml_type, experts, rows, cols in PACKED_CASES:
        rng = np.random.default_rng(cols)
        w = rng.standard_normal((experts * rows, cols)).astype(np.float32)
        for case, raw in (("random bytes", random_blocks(rng, ggml_type, experts * rows * cols)),
                          ("ggml-quantized", ggml_quantized(w, ggml_type).reshape(-1))):
            want = gguf_dequantize(raw.reshape(experts * rows, -1), Q[ggml_type]).reshape(experts, rows, cols)
            out = torch.full((experts, rows + 16, cols), float("nan"), device=device)
            dequantize(torch.from_numpy(pack(raw, ggml_type, rows, cols).reshape(-1)).to(device), ggml_type,
                       out[:, 8:rows + 8], packed=True)
            got = out[:, 8:rows + 8].cpu().numpy()
            assert np.array_equal(got, want.astype(np.float32)), \
                f"{ggml_type} {case}: max diff {np.nanmax(np.abs(got - want))}"
            assert torch.isnan(out[:, :8]).all() and torch.isnan(out[:, rows + 8:]).all(), \
                f"{ggml_type}: wrote outside out"


def check_gather(device: str) -> None:
    """gather_rows copies whole rows in the ids' order (repeats too), words and odd byte counts,
    skips negative ids (below ``first``), reads the last row for ids past it, and writes nothing else."""
    rng = np.random.default_rng(5)
    for row_bytes in (884_736 // 64, 4 * 2048 + 4, 210 * 3 + 1):  # 4-byte words over chunks; bytes
        src = torch.from_numpy(rng.integers(0, 256, size=(9, row_bytes), dtype=np.uint8))
        ids = torch.tensor([4, 0, 4, 8, 2], dtype=torch.int32)
        out = torch.zeros(len(ids) + 1, row_bytes, dtype=torch.uint8, device=device)
        gather_rows(src.to(device), ids.to(device), out[:len(ids)])
        assert torch.equal(out[:len(ids)].cpu(), src[ids.long()]), f"{row_bytes} bytes per row"
        assert not out[-1].any(), "wrote past the gathered rows"
        out = torch.full((3, row_bytes), 7, dtype=torch.uint8, device=device)
        gather_rows(src.to(device), torch.tensor([-3, 99, -1], device=device), out)
        assert (out[0] == 7).all() and (out[2] == 7).all(), "rows of negative ids are left as they are"
        assert torch.equal(out[1].cpu(), src[8]), "ids past the rows read the last one"
        # rows numbered from 5 (an expert-parallel part's experts, as the router numbers them)
        out = torch.full((4, row_bytes), 7, dtype=torch.uint8, device=device)
        gather_rows(src.to(device), torch.tensor([9, 4, 5, -1], device=device), out, first=5)
        assert torch.equal(out[0].cpu(), src[4]) and torch.equal(out[2].cpu(), src[0]), "row = id - first"
        assert (out[1] == 7).all() and (out[3] == 7).all(), "ids below first are left as they are"
    # A share of each row (some of its lines, some bytes of each line: a tensor-parallel rank's) into
    # a strided out: 4-byte words (Q4_K rows), bytes (Q8_0 rows of 5 blocks), a 2-d share of each row.
    for lines, line, cut in ((6, 144 * 3, slice(144, 432)), (5, 34 * 5, slice(34, 102)), (1, 600, slice(8, 200))):
        whole = torch.from_numpy(rng.integers(0, 256, size=(7, lines, line), dtype=np.uint8))
        share = slice(1, 4) if lines > 1 else slice(0, 1)
        src = whole.to(device)[:, share, cut]
        if lines == 1:
            src = src[:, 0]
        ids = torch.tensor([6, 1, 1, 0], dtype=torch.int64)
        padded = torch.full((len(ids), *src.shape[1:-1], src.shape[-1] + 8), 7, dtype=torch.uint8, device=device)
        gather_rows(src, ids.to(device), padded[..., 4:-4])
        assert torch.equal(padded[..., 4:-4].cpu(), whole[ids][:, share, cut].reshape(padded[..., 4:-4].shape)), \
            f"a share of rows of {lines} lines of {line} bytes"
        assert (padded[..., :4] == 7).all() and (padded[..., -4:] == 7).all(), "wrote outside out"


def quantized_experts(rng: np.random.Generator, ggml_type: str, n: int, rows: int, cols: int):
    """(bytes [n, bytes of one], f64 values [n, rows, cols]) of n experts' ggml-quantized weights
    (RANDOM_ONLY types: random blocks)."""
    w = (rng.standard_normal((n * rows, cols)) / np.sqrt(cols)).astype(np.float32)
    if ggml_type == "BF16":
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    elif ggml_type in FLOAT_TYPES:
        raw = w.astype(np.float16 if ggml_type == "F16" else np.float32).view(np.uint8)
    elif ggml_type in RANDOM_ONLY:
        raw = random_blocks(rng, ggml_type, n * rows * cols)
    else:
        raw = ggml_quantized(w, ggml_type)
    values = gguf_dequantize(raw.reshape(n * rows, -1), Q[ggml_type]).reshape(n, rows, cols)
    return raw.reshape(n, -1), values.astype(np.float64)


def check_experts(device: str) -> None:
    """gated_activations + weighted_down (from the staged experts' bytes, slot [t, j] using staged
    expert slot_expert[t, j], repeats and -1 included) against the f64 reference of the
    dequantized weights; a token whose slots are all -1 gets exactly 0. A share's case has gate
    and up rows [lead, lead + width) of down's columns."""
    for case, packed in [(c, False) for c in EXPERT_CASES] + [(c, True) for c in PACKED_EXPERT_CASES]:
        up_type, down_type, n, g, hidden, columns, fused, dtype, *share = case
        lead, inter = share or (0, columns)
        rng = np.random.default_rng(hidden + inter)
        staged = n * g + 1

        def staged_bytes(raw: np.ndarray, ggml_type: str, rows: int, cols: int) -> torch.Tensor:
            return torch.from_numpy(pack(raw, ggml_type, rows, cols) if packed else raw.copy()).to(device)

        if fused:
            raw, values = quantized_experts(rng, up_type, staged, 2 * inter, hidden)
            data = staged_bytes(raw, up_type, 2 * inter, hidden)
            half = packed_nbytes(up_type, inter, hidden) if packed else inter * raw_nbytes(up_type, hidden)
            gate = StagedProjection(data, up_type, inter, hidden, packed=packed)
            up = StagedProjection(data, up_type, inter, hidden, at=half, packed=packed)
            w_gate, w_up = values[:, :inter], values[:, inter:]
        else:
            (raw_g, w_gate), (raw_u, w_up) = (quantized_experts(rng, up_type, staged, inter, hidden) for _ in "gu")
            gate = StagedProjection(staged_bytes(raw_g, up_type, inter, hidden), up_type, inter, hidden, packed=packed)
            up = StagedProjection(staged_bytes(raw_u, up_type, inter, hidden), up_type, inter, hidden, packed=packed)
        raw_d, w_down = quantized_experts(rng, down_type, staged, hidden, columns)
        down = StagedProjection(staged_bytes(raw_d, down_type, hidden, columns), down_type, hidden, columns,
                                packed=packed)
        case = (*case, "packed") if packed else case
        w_down = w_down[:, :, lead:lead + inter]
        n += 1  # one more token, without an expert
        x = torch.from_numpy(rng.standard_normal((n, hidden)).astype(np.float32)).to(dtype)
        weights = torch.from_numpy(rng.uniform(0.1, 1.0, (n, g)).astype(np.float32))
        slot_expert = torch.from_numpy(rng.integers(-1, staged, (n, g)).astype(np.int32))
        slot_expert[0, 0], slot_expert[-1] = staged - 1, -1
        act = gated_activations(x.to(device), gate, up, slot_expert.to(device))
        out = weighted_down(act, down, weights.to(device), slot_expert.to(device), dtype, lead).double().cpu().numpy()
        xd, want = x.double().numpy(), np.zeros((n, hidden))
        for t in range(n):
            for j, e in enumerate(slot_expert[t].tolist()):
                if e >= 0:
                    h = w_gate[e] @ xd[t]
                    want[t] += weights[t, j].item() * (w_down[e] @ (h / (1 + np.exp(-h)) * (w_up[e] @ xd[t])))
        err = np.linalg.norm(out - want) / np.linalg.norm(want)
        # float32 sums of the exact values; the output rounded to dtype
        assert err < {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype], f"{case}: {err:.2e}"
        assert not out[-1].any(), f"{case}: a token without an expert got {out[-1]}"


def check_split(device: str) -> None:
    """split_routing against a plain-Python sharing of the same ids: the GPU takes the last
    round(d * g / k) of the d distinct experts (in order of first appearance), each once, at most
    ``most``; with real_rows, the rows past it (padding) have no expert; with held, neither have
    the slots of experts outside it. The GPU's experts of every call add up in ``counts`` (pinned
    host memory next to a GPU, read without a CUDA call)."""
    rng = np.random.default_rng(11)
    counts = torch.zeros(1, dtype=torch.int64, device=device)
    mirror = torch.zeros(1, dtype=torch.int64, pin_memory=device == "cuda")
    fetched = 0
    for n, k, g, n_experts, real, most, held in [
            (1, 8, 3, 128, None, None, None), (8, 8, 3, 128, None, None, None), (8, 8, 4, 16, 5, None, None),
            (3, 4, 1, 6, 3, None, None), (5, 6, 5, 64, 0, None, None), (2, 8, 7, 8, -1, None, None),
            (4, 8, 2, 128, 9, None, None), (16, 8, 5, 128, None, 32, None), (16, 8, 3, 128, 11, 32, None),
            (4, 8, 6, 128, None, 5, None), (8, 8, 3, 128, None, None, range(64, 128)),
            (16, 8, 3, 128, 11, 32, range(0, 32)), (4, 8, 2, 16, None, None, range(15, 16))]:
        ids = np.stack([rng.permutation(n_experts)[:k] for _ in range(n)])
        ids[rng.random(ids.shape) < 0.1] = -1  # slots without an expert
        real_rows = None if real is None else torch.tensor([real], dtype=torch.int32, device=device)
        cpu_ids, gpu_experts, slot_expert = (t.cpu().numpy() for t in
                                             split_routing(torch.from_numpy(ids).to(device), g, real_rows, most, held,
                                                           counts, mirror))
        if real is not None and 0 <= real < n:
            ids[real:] = -1
        if held is not None:
            ids[(ids < held.start) | (ids >= held.stop)] = -1
        distinct = list(dict.fromkeys(e for e in ids.reshape(-1).tolist() if e >= 0))
        length = min(most or n * g, n * g)
        m = min((2 * len(distinct) * g + k) // (2 * k), length)
        mine = distinct[len(distinct) - m:] if m else []
        case = f"{n} tokens ({real} real), {g} of {k}, {len(distinct)} distinct, at most {most}, held {held}"
        assert gpu_experts.tolist() == mine + [-1] * (length - m), case
        assert (cpu_ids == np.where(np.isin(ids, mine), -1, ids)).all(), case
        assert (slot_expert == [[mine.index(e) if e in mine else -1 for e in row] for row in ids.tolist()]).all(), case
        fetched += m
        assert counts.item() == mirror.item() == fetched, case


@pytest.fixture(scope="module")
def interpreter_results():
    """Run every check in one child process under Triton's interpreter (no GPU here)."""
    import triton  # noqa: F401  (a dependency of `pip install .[test]`: missing, the tests fail here)

    code = ("import sys, test_gpu_dequant as t\n"
            "for name in t.CHECKS:\n"
            "    try:\n        getattr(t, 'check_' + name, lambda d: t.check_type(name, d))('cpu'); print(name, 'ok')\n"
            "    except AssertionError as e:\n        print(name, 'FAIL', e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(line.split(" ", 1) for line in run.stdout.splitlines())


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_matches_gguf_py(ggml_type, request):
    if torch.cuda.is_available():
        check_type(ggml_type, "cuda")
    else:
        assert request.getfixturevalue("interpreter_results")[ggml_type] == "ok"


def test_dequantize_reads_the_cpu_engines_packed_layout(request):
    if torch.cuda.is_available():
        check_packed("cuda")
    else:
        assert request.getfixturevalue("interpreter_results")["packed"] == "ok"


def test_gather_rows_copies_the_chosen_rows(request):
    if torch.cuda.is_available():
        check_gather("cuda")
    else:
        assert request.getfixturevalue("interpreter_results")["gather"] == "ok"


def test_experts_multiply_from_their_bytes(request):
    if torch.cuda.is_available():
        check_experts("cuda")
    else:
        assert request.getfixturevalue("interpreter_results")["experts"] == "ok"


def test_split_routing_shares_the_distinct_experts(request):
    if torch.cuda.is_available():
        check_split("cuda")
    else:
        assert request.getfixturevalue("interpreter_results")["split"] == "ok"


def test_blocks_are_ggmls():
    """Every quantized type's block as ggml's (gguf-py's sizes), dividing the expert kernels' 256
    columns a step; the decoders' lookup tables are made once per device."""
    for ggml_type, (qk, size) in QUANT_BLOCKS.items():
        assert GGML_QUANT_SIZES[Q[ggml_type]] == (qk, size) and 256 % qk == 0, ggml_type
        assert raw_nbytes(ggml_type.lower(), 3 * 256) == 3 * 256 // qk * size, ggml_type
    tables = _lookup_tables(torch.device("cpu"))
    assert tables.dtype == torch.int8 and _lookup_tables(torch.device("cpu")) is tables


def test_bad_arguments_are_refused_before_any_kernel():
    out = torch.empty(2, 4, 256)
    raw = torch.zeros(raw_nbytes("Q4_K", out.numel()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="no GPU dequantization for TQ2_0"):
        dequantize(raw, "TQ2_0", out)
    with pytest.raises(ValueError, match=r"raw must be 1152 uint8 bytes on cpu \(Q4_K, 2x4x256\); found 1151"):
        dequantize(raw[:-1], "Q4_K", out)
    with pytest.raises(ValueError, match="contiguous rows"):
        dequantize(raw, "Q4_K", out.transpose(1, 2))
    with pytest.raises(ValueError, match="first is the id of src's row 0, at least 0; found -1"):
        gather_rows(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.int32),
                    torch.zeros(1, 8, dtype=torch.uint8), first=-1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dequantize(raw, "Q4_K", out.to(torch.int32))
    with pytest.raises(ValueError, match="whole blocks of 256"):
        dequantize(torch.zeros(raw_nbytes("Q8_0", 2 * 4 * 96), dtype=torch.uint8), "Q4_K", torch.empty(2, 4, 96))
    # lvgg's packed layout: its types, in groups of 16 rows
    with pytest.raises(ValueError, match=r"no GPU dequantization for Q5_0 in the packed layout; supported: \['IQ2_S'"):
        dequantize(raw, "Q5_0", out, packed=True)
    with pytest.raises(ValueError, match=r"no packed layout for a 4x256 q4_K matrix: .* rows a multiple of 16"):
        dequantize(raw, "Q4_K", out, packed=True)
    packed = torch.zeros(2 * packed_nbytes("Q6_K", 16, 512), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"raw must be 13440 uint8 bytes on cpu \(Q6_K, packed, 2x16x512\); "
                                         r"found 13439"):
        dequantize(packed[:-1], "Q6_K", torch.empty(2, 16, 512), packed=True)


def test_bad_expert_arguments_are_refused_before_any_kernel():
    x = torch.zeros(2, 256)
    slot_expert = torch.zeros(2, 2, dtype=torch.int32)
    gate = StagedProjection(torch.zeros(4, raw_nbytes("Q4_K", 64 * 256), dtype=torch.uint8), "Q4_K", 64, 256)
    with pytest.raises(ValueError, match=r"up bytes must be contiguous uint8 \[>= 1, >= 9216\] on cpu, found "
                                         r"torch.uint8 \[0, 9216\]"):
        gated_activations(x, gate, StagedProjection(gate.data[:0], "Q4_K", 64, 256), slot_expert)
    with pytest.raises(ValueError, match=r"up must be 64x256 \(Q4_K: rows of whole blocks of 256\), found 32x256"):
        gated_activations(x, gate, StagedProjection(gate.data, "Q4_K", 32, 256), slot_expert)
    with pytest.raises(ValueError, match="no GPU kernels for TQ2_0"):
        gated_activations(x, gate, StagedProjection(gate.data, "TQ2_0", 64, 256), slot_expert)
    with pytest.raises(ValueError, match=r"up in the packed layout must be \['IQ2_S', .*, 'Q8_0'\] "
                                         r"in groups of 16 rows, found Q5_0 with 64 rows"):
        gated_activations(x, gate, StagedProjection(gate.data, "Q5_0", 64, 256, packed=True), slot_expert)
    with pytest.raises(ValueError, match="gate and up must be both packed or both in the file's layout"):
        packed_up = torch.zeros(4, packed_nbytes("Q4_K", 64, 256), dtype=torch.uint8)
        gated_activations(x, gate, StagedProjection(packed_up, "Q4_K", 64, 256, packed=True), slot_expert)
    with pytest.raises(ValueError, match="x must be a contiguous float"):
        gated_activations(x.t(), gate, gate, slot_expert)
    with pytest.raises(ValueError, match=r"slot_expert must be contiguous int32 \[2, experts per token\] on cpu, "
                                         r"found torch.int64 \[2, 2\]"):
        gated_activations(x, gate, gate, slot_expert.long())
    act = torch.zeros(4, 64)
    down = StagedProjection(torch.zeros(4, raw_nbytes("Q8_0", 256 * 64), dtype=torch.uint8), "Q8_0", 256, 64)
    with pytest.raises(ValueError, match="weights must be contiguous float32"):
        weighted_down(act, down, torch.ones(2, 2, dtype=torch.float64), slot_expert, torch.float32)
    with pytest.raises(ValueError, match=r"slot_expert must be \[2, 3\] like the weights, found \[2, 2\]"):
        weighted_down(act, down, torch.ones(2, 3), slot_expert, torch.float32)
    with pytest.raises(ValueError, match=r"act must be contiguous float32 \[6, intermediate\]"):
        weighted_down(act, down, torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.int32), torch.float32)
    with pytest.raises(ValueError, match="act's 64 columns from lead 0 must lie within down's 32"):
        weighted_down(act, StagedProjection(down.data, "Q8_0", 256, 32), torch.ones(2, 2), slot_expert, torch.float32)
    with pytest.raises(ValueError, match="act's 64 columns from lead 8 must lie within down's 64"):
        weighted_down(act, down, torch.ones(2, 2), slot_expert, torch.float32, lead=8)
    with pytest.raises(ValueError, match=r"topk_ids must be \[tokens, experts per token\] int32/int64"):
        split_routing(torch.zeros(8, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"gpu_slots must be 1..7 \(of 8 experts per token\), found 8"):
        split_routing(torch.zeros(2, 8, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"real_rows must be one int32 on cpu, found torch.int64 \[1\]"):
        split_routing(torch.zeros(2, 8, dtype=torch.int32), 3, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"most must be at least 1 \(the GPU's experts per call\), found 0"):
        split_routing(torch.zeros(2, 8, dtype=torch.int32), 3, most=0)
    with pytest.raises(ValueError, match=r"held must be a range of experts \[start, stop\), 0 <= start < stop, "
                                         r"found range\(8, 8\)"):
        split_routing(torch.zeros(2, 8, dtype=torch.int32), 3, held=range(8, 8))
    with pytest.raises(ValueError, match=r"counts must be one int64 on cpu, found torch.int32 \[1\]"):
        split_routing(torch.zeros(2, 8, dtype=torch.int32), 3, counts=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"counts_mirror must be one int64 in pinned host memory beside counts"):
        split_routing(torch.zeros(2, 8, dtype=torch.int32), 3, counts_mirror=torch.zeros(1, dtype=torch.int64))
