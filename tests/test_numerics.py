"""The CPU MoE engine against an f64 reference built from gguf-py's dequantization."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lvgg
from lvgg.testing.expert_files import random_experts, read_reference, write_experts_file

E = 8
# Relative L2 error bounds, about twice what ggml reaches: activations are quantized inside
# the kernels (to Q8_0/Q8_K for quantized weights, to the weight type for F16/BF16).
TOLERANCE = {
    Q.F32: 1e-5, Q.F16: 2e-3, Q.BF16: 8e-3, Q.Q8_0: 2.5e-2,
    Q.Q4_0: 3e-2, Q.Q4_1: 3e-2, Q.Q5_0: 3e-2, Q.Q5_1: 3e-2,
    Q.Q2_K: 3.5e-2, Q.Q3_K: 3.5e-2, Q.Q4_K: 3.5e-2, Q.Q5_K: 3.5e-2, Q.Q6_K: 3.5e-2,
    Q.IQ4_XS: 3.5e-2, Q.IQ4_NL: 3.5e-2,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Output rounding to 16 bits adds to the error.
OUT_ROUNDING = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3}


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def run(moe, layer, x, ids, w):
    out = torch.full_like(x, float("nan"))  # poison: rows the engine does not write fail
    moe(layer, x, ids, w, out)
    return out.float().numpy()


@pytest.fixture(scope="module", params=list(TOLERANCE), ids=lambda q: q.name)
def typed_file(request, tmp_path_factory):
    qtype = request.param
    rng = np.random.default_rng(int(qtype))
    D, F = 256, 512  # multiples of every block size (256 for K-quants)
    path = tmp_path_factory.mktemp("experts") / f"{qtype.name}.gguf"
    write_experts_file(path, {1: random_experts(rng, E, D, F), 4: random_experts(rng, E, D, F)}, qtype)
    store = lvgg.ExpertStore(path)
    both_layouts = lvgg.ExpertStore(path, keep_mapped=True)
    engines = {"mul_mat_id": lvgg.CpuMoE(store, threads=2),
               "per_expert": lvgg.CpuMoE(both_layouts, threads=2, schedule="per_expert")}
    return qtype, path, store, engines, read_reference(path, 4)


@pytest.mark.parametrize("schedule", ["mul_mat_id", "per_expert"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("T", [1, 2, 7, 64, 513])
def test_forward_matches_f64_reference(typed_file, T, dtype, schedule, rng):
    qtype, _, _, engines, ref = typed_file
    moe = engines[schedule]
    K = int(rng.integers(1, 9))
    x = torch.from_numpy(rng.standard_normal((T, 256)).astype(np.float32)).to(DTYPES[dtype])
    ids = torch.from_numpy(np.stack([rng.choice(E, K, replace=False) for _ in range(T)])).to(torch.int64)
    w = torch.from_numpy(rng.random((T, K)).astype(np.float32))
    out = run(moe, 4, x, ids, w)
    expected = ref.forward(x.double().numpy(), ids.numpy(), w.numpy())
    assert rel_err(out, expected) < TOLERANCE[qtype] + OUT_ROUNDING[dtype]


@pytest.mark.parametrize("schedule", ["mul_mat_id", "per_expert"])
@pytest.mark.parametrize("rows", [[[1, 1, 2]], [[2, 1, 2]], [[5, 5, 2], [0, 0, 0], [7, 1, 7]]])
def test_duplicated_ids_in_a_row_count_twice(typed_file, rows, schedule, rng):
    qtype, _, _, engines, ref = typed_file
    moe = engines[schedule]
    ids = torch.tensor(rows, dtype=torch.int32)
    x = torch.from_numpy(rng.standard_normal((len(rows), 256)).astype(np.float32))
    w = torch.from_numpy(rng.random(ids.shape).astype(np.float32))
    out = run(moe, 4, x, ids, w)
    assert rel_err(out, ref.forward(x.numpy(), ids.numpy(), w.numpy())) < TOLERANCE[qtype]


@pytest.mark.parametrize("schedule", ["mul_mat_id", "per_expert"])
def test_slots_without_an_expert_add_nothing(typed_file, schedule, rng):
    qtype, _, _, engines, ref = typed_file
    ids = torch.tensor([[3, -1, 5], [-1, -1, -1], [2, 2, -1], [-1, 6, 1], [7, 0, 4]], dtype=torch.int64)
    x = torch.from_numpy(rng.standard_normal((len(ids), 256)).astype(np.float32))
    w = torch.from_numpy(rng.random(ids.shape).astype(np.float32))
    out = run(engines[schedule], 4, x, ids, w)
    assert not out[1].any()  # no expert at all: exactly zero
    assert rel_err(out, ref.forward(x.numpy(), ids.numpy(), w.numpy())) < TOLERANCE[qtype]


def test_thread_counts_give_identical_results(typed_file, rng):
    _, _, store, engines, _ = typed_file
    moe1, moe2 = lvgg.CpuMoE(store, threads=1), engines["mul_mat_id"]
    x = torch.from_numpy(rng.standard_normal((70, 256)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, E, (70, 8))).to(torch.int32)
    w = torch.from_numpy(rng.random((70, 8)).astype(np.float32))
    assert moe2.threads == 2 and moe1.threads == 1
    np.testing.assert_array_equal(run(moe1, 1, x, ids, w), run(moe2, 1, x, ids, w))


def test_numpy_inputs_are_accepted_zero_copy(typed_file, rng):
    qtype, _, _, engines, ref = typed_file
    moe = engines["mul_mat_id"]
    x = rng.standard_normal((5, 256)).astype(np.float32)
    ids = rng.integers(0, E, (5, 2)).astype(np.int32)
    w = rng.random((5, 2)).astype(np.float32)
    out = np.full((5, 256), np.nan, np.float32)
    assert moe(4, x, ids, w, out) is out
    assert rel_err(out, ref.forward(x, ids, w)) < TOLERANCE[qtype]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    qtype=st.sampled_from([Q.Q4_K, Q.Q8_0, Q.BF16, Q.Q5_0, Q.IQ4_NL]),
    d_blocks=st.integers(1, 3), f_blocks=st.integers(1, 3),
    top_k=st.integers(1, 8), tokens=st.integers(1, 40),
    form=st.sampled_from(["gate+up+down", "gate_up+down", "up+down"]),
    activation=st.sampled_from(["silu", "gelu", "swigluoai", "swiglustep"]), biased=st.booleans(),
    chunk=st.sampled_from([1, 16, 512]),
    schedule=st.sampled_from(["mul_mat_id", "per_expert"]),
    seed=st.integers(0, 2**31),
)
def test_random_shapes_forms_and_chunks(tmp_path, qtype, d_blocks, f_blocks, top_k, tokens, form, activation,
                                        biased, chunk, schedule, seed):
    rng = np.random.default_rng(seed)
    block = 256 if qtype == Q.Q4_K else 32
    D, F = d_blocks * block, f_blocks * block
    path = write_experts_file(tmp_path / f"{seed}.gguf", {0: random_experts(rng, E, D, F, form, biased)}, qtype)
    act = "relu2" if form == "up+down" else activation
    moe = lvgg.CpuMoE(lvgg.ExpertStore(path, keep_mapped=True), threads=2, chunk=chunk, activation=act,
                      schedule=schedule)
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    ids = rng.integers(0, E, (tokens, top_k)).astype(np.int64)
    w = rng.random((tokens, top_k)).astype(np.float32)
    out = np.full((tokens, D), np.nan, np.float32)
    moe(0, x, ids, w, out)
    expected = read_reference(path, 0).forward(x, ids, w, act)
    assert rel_err(out, expected) < TOLERANCE[qtype]


@pytest.mark.parametrize("engine", ["one", "nodes"])
@pytest.mark.parametrize("form", ["gate+up+down", "gate_up+down"])
def test_layers_of_one_engine_take_activations_of_their_own(tmp_path, rng, engine, form):
    """Step-3.5 clamps some layers' SwiGLU (vLLM's swiglustep: silu(gate) at most 7, up within
    [-7, 7]) and not others': set per layer, on every NUMA part, checked against the f64 reference
    with inputs large enough that the clamps bind."""
    path = write_experts_file(tmp_path / "s.gguf", {i: random_experts(rng, E, 64, 96, form) for i in (0, 1)}, Q.F32)
    store = lvgg.ExpertStore(path)
    moe = lvgg.CpuMoE(store, threads=1) if engine == "one" else \
        lvgg.CpuMoE(store, nodes=[lvgg.EngineNode([0]), lvgg.EngineNode([1])])
    moe.set_activation(1, "swiglustep")
    assert (moe.activation_of(0), moe.activation_of(1)) == ("silu", "swiglustep")
    x = 20 * rng.standard_normal((6, 64)).astype(np.float32)
    ids = np.stack([rng.choice(E, 3, replace=False) for _ in range(6)]).astype(np.int32)
    w = rng.random((6, 3)).astype(np.float32)
    for layer, activation in ((0, "silu"), (1, "swiglustep")):
        ref = read_reference(path, layer)
        assert rel_err(moe(layer, x, ids, w), ref.forward(x, ids, w, activation)) < TOLERANCE[Q.F32], layer
    assert rel_err(ref.forward(x, ids, w, "silu"), ref.forward(x, ids, w, "swiglustep")) > 0.1  # the clamps bound
    with pytest.raises(ValueError, match="activation 'relu2' for gated experts of an engine made for 'silu'"):
        moe.set_activation(1, "relu2")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        moe.set_activation(1, "swish")
    with pytest.raises(IndexError):
        moe.set_activation(5, "silu")


def test_tokens_beyond_one_chunk_run_in_chunks(tmp_path, rng):
    path = write_experts_file(tmp_path / "c.gguf", {0: random_experts(rng, E, 64, 96)}, Q.F32)
    store = lvgg.ExpertStore(path)
    x = rng.standard_normal((1030, 64)).astype(np.float32)
    ids = rng.integers(0, E, (1030, 2)).astype(np.int32)
    w = rng.random((1030, 2)).astype(np.float32)
    whole = lvgg.CpuMoE(store, threads=1, chunk=2048)(0, x, ids, w)
    chunked = lvgg.CpuMoE(store, threads=1, chunk=100)(0, x, ids, w)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
    assert rel_err(whole, read_reference(path, 0).forward(x, ids, w)) < TOLERANCE[Q.F32]


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q4_0], ids=lambda q: q.name)  # repacked on every AVX2 CPU
def test_both_layouts_kept_each_match_the_reference(tmp_path, qtype, rng):
    path = write_experts_file(tmp_path / "b.gguf", {0: random_experts(rng, E, 256, 512)}, qtype)
    store = lvgg.ExpertStore(path, keep_mapped=True, own_kernels=False)  # lvgg's packed layout runs at every size
    assert store.layer_info(0).repacked == {"gate": True, "up": True, "down": True}
    ref = read_reference(path, 0)
    x = rng.standard_normal((40, 256)).astype(np.float32)
    ids = np.stack([rng.choice(E, 4, replace=False) for _ in range(40)]).astype(np.int32)
    w = rng.random((40, 4)).astype(np.float32)
    expected = ref.forward(x, ids, w)
    for limit in (0, 10**6):  # mapped layout for every chunk, then repacked for every chunk
        moe = lvgg.CpuMoE(store, threads=2, repack_max_tokens=limit)
        assert rel_err(moe(0, x, ids, w), expected) < TOLERANCE[qtype]


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q4_0], ids=lambda q: q.name)  # repacked on every AVX2 CPU
def test_separate_gate_and_up_run_as_one_fused_tensor(tmp_path, qtype, rng):
    """Where gate and up are repacked they are repacked together (one MUL_MAT_ID instead of two):
    the result is bit for bit that of a file whose gate_up is fused, and of its NUMA parts."""
    separate = random_experts(rng, E, 256, 512)
    fused = {"gate_up": np.concatenate([separate["gate"], separate["up"]], axis=1), "down": separate["down"]}
    paths = [write_experts_file(tmp_path / f"{name}.gguf", {0: layer}, qtype)
             for name, layer in (("separate", separate), ("fused", fused))]
    x = torch.randn(5, 256)
    ids = torch.stack([torch.randperm(E)[:4] for _ in range(5)]).to(torch.int32)
    w = torch.rand(5, 4)
    outs = [lvgg.CpuMoE(lvgg.ExpertStore(p), threads=2)(0, x, ids, w) for p in paths]
    assert torch.equal(outs[0], outs[1])
    parts = lvgg.CpuMoE(lvgg.ExpertStore(paths[0], repack=False), nodes=[lvgg.EngineNode([0]), lvgg.EngineNode([1])])
    assert parts.store.layer_info(0).form == "gate+up+down"  # what the file holds
    assert rel_err(parts(0, x, ids, w), outs[0].double().numpy()) < 1e-6
    # with both layouts kept, the mapped gate and up still serve long batches
    both = lvgg.CpuMoE(lvgg.ExpertStore(paths[0], keep_mapped=True), threads=2, repack_max_tokens=0)
    assert rel_err(both(0, x, ids, w), read_reference(paths[0], 0).forward(
        x.numpy(), ids.numpy(), w.numpy())) < TOLERANCE[qtype]


@pytest.mark.parametrize("form", ["gate+up+down", "gate_up+down", "up+down"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.Q4_0, Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
def test_biased_experts_on_every_path(tmp_path, qtype, form, rng):
    """gpt-oss's experts: a bias on every projection, its clamped SwiGLU. Every layout and schedule
    (repacked by lvgg or ggml, mapped, per expert) and every split (rows and experts parts, whose
    outputs sum, and NUMA nodes) against the reference; slots without an expert add nothing."""
    path = write_experts_file(tmp_path / "b.gguf", {0: random_experts(rng, E, 256, 512, form, biased=True)}, qtype)
    act = "relu2" if form == "up+down" else "swigluoai"
    x = rng.standard_normal((9, 256)).astype(np.float32)
    ids = np.stack([rng.choice(E, 4, replace=False) for _ in range(9)]).astype(np.int32)
    ids[0, 1] = -1
    w = rng.random((9, 4)).astype(np.float32)
    expected = read_reference(path, 0).forward(x, ids, w, act)
    mapped = lvgg.ExpertStore(path, repack=False)
    assert mapped.layer_info(0).biased
    outs = {"repacked": lvgg.CpuMoE(lvgg.ExpertStore(path), threads=2, activation=act)(0, x, ids, w),
            "ggml repacked": lvgg.CpuMoE(lvgg.ExpertStore(path, own_kernels=False), threads=2,
                                         activation=act)(0, x, ids, w),
            "mapped": lvgg.CpuMoE(mapped, threads=2, activation=act)(0, x, ids, w),
            "per expert": lvgg.CpuMoE(mapped, threads=2, activation=act, schedule="per_expert")(0, x, ids, w),
            "nodes": lvgg.CpuMoE(mapped, nodes=[lvgg.EngineNode([0]), lvgg.EngineNode([1])],
                                 activation=act)(0, x, ids, w)}
    for by in ("rows", "experts"):
        outs[f"{by} parts"] = sum(lvgg.CpuMoE(mapped.part(i, 2, by=by), threads=1, activation=act)(0, x, ids, w)
                                  for i in range(2))
    errors = {name: rel_err(out, expected) for name, out in outs.items()}
    assert max(errors.values()) < TOLERANCE[qtype], errors
