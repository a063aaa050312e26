"""lvgg's own kernels (ggml_bridge/src/vnni_kquants.h) against the f64 reference built from
gguf-py's dequantization, and against ggml's kernels on the same file: every kernel set the build
has (AVX-512 VNNI and AVX2 on a VNNI machine, AVX2 on others), each test on each."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import lvgg
import lvgg.experts
from lvgg import _bridge
from lvgg.testing.expert_files import random_experts, read_reference, write_experts_file

E = 8
TOLERANCE = 3.5e-2  # relative L2 error vs the f64 reference, as for every K-quant (test_numerics.py)


def rel_err(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def routing(rng, tokens: int, top_k: int, repeats: bool):
    if repeats:  # experts may repeat within a row: their weights add up
        ids = rng.integers(0, E, (tokens, top_k))
    else:
        ids = np.stack([rng.choice(E, top_k, replace=False) for _ in range(tokens)])
    return ids.astype(np.int32), rng.random((tokens, top_k)).astype(np.float32)


def run(moe, x, ids, w):
    out = torch.full_like(x, float("nan"))  # poison: rows the kernels do not write fail
    moe(0, x, torch.from_numpy(ids), torch.from_numpy(w), out)
    return out.float().numpy()


@pytest.fixture(params=_bridge.cpu_features()["lvgg_kernel_sets"] or ["none"])
def kernels(request):
    """Runs the test on one of lvgg's kernel sets (stores made in it pack what that set runs)."""
    before = _bridge.cpu_features()["lvgg_kernels"]
    if request.param != "none":
        _bridge.use_kernels(request.param)
    yield request.param
    if before:
        _bridge.use_kernels(before)


def packs(path, qtype: Q, **store_args) -> bool:
    """Every projection of layer 0 is in lvgg's packed layout, as the kernel set in use runs ``qtype``."""
    packed = lvgg.ExpertStore(path, **store_args).layer_info(0).packed.values()
    expected = _bridge.packable(int(qtype), 16, 256)
    assert all(p == expected for p in packed), (qtype.name, packed)
    return expected


def test_a_native_build_has_the_kernels_its_cpu_runs(tmp_path, rng):
    """A native build has the AVX-512 VNNI kernels on a CPU with VNNI (first: they are the default),
    and the AVX2 ones on any CPU with AVX2, FMA and F16C; stores pack what the set in use runs."""
    f = _bridge.cpu_features()
    assert ("avx512_vnni" in f["lvgg_kernel_sets"]) == f["avx512_vnni"]
    assert ("avx2" in f["lvgg_kernel_sets"]) == (f["avx2"] and f["fma"] and f["f16c"])
    assert f["lvgg_kernels"] == (f["lvgg_kernel_sets"] or [""])[0]
    with pytest.raises(ValueError, match="no kernel set 'sse9' in this build; it has: "):
        _bridge.use_kernels("sse9")
    path = write_experts_file(tmp_path / "p.gguf", {0: random_experts(rng, E, 256, 256)}, Q.Q4_K)
    # what the file's header predicts (runtime.choose_repack asks it) is what the store does
    assert lvgg.experts.packs_every_expert(path) == packs(path, Q.Q4_K) == bool(f["lvgg_kernels"])
    assert not lvgg.experts.packs_every_expert(path, own_kernels=False)
    assert not any(lvgg.ExpertStore(path, own_kernels=False).layer_info(0).packed.values())
    assert not any(lvgg.ExpertStore(path, repack=False).layer_info(0).packed.values())


GRID_TYPES = (Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S)


@pytest.mark.parametrize("qtype", GRID_TYPES, ids=lambda q: q.name)
def test_grid_types_are_packed_where_vpermi2b_looks_them_up(tmp_path, qtype, rng):
    """The IQ2/IQ3 types are packed by the AVX-512 VNNI set of a build for a CPU with VBMI only (the
    AVX2 set leaves them to ggml's kernels, faster there than gathers); where the VNNI set packed
    them, every set runs them (the AVX2 one byte by byte), and each matches the f64 reference."""
    f = _bridge.cpu_features()
    path = write_experts_file(tmp_path / "g.gguf", {0: random_experts(rng, E, 512, 256)}, qtype)
    before = f["lvgg_kernels"]
    ref = read_reference(path, 0)
    x = torch.randn(5, 512)
    ids, w = routing(rng, 5, 4, repeats=True)
    expected = ref.forward(x.numpy(), ids, w)
    try:
        for kernels in f["lvgg_kernel_sets"]:
            _bridge.use_kernels(kernels)
            assert packs(path, qtype) == (kernels == "avx512_vnni" and f["avx512_vbmi"])
        if "avx512_vnni" in f["lvgg_kernel_sets"]:
            _bridge.use_kernels("avx512_vnni")
        store = lvgg.ExpertStore(path)  # packed by the best set, if it packs this type at all
        for kernels in f["lvgg_kernel_sets"]:
            _bridge.use_kernels(kernels)
            assert rel_err(run(lvgg.CpuMoE(store, threads=2), x, ids, w), expected) < TOLERANCE, kernels
    finally:
        if before:
            _bridge.use_kernels(before)


# 512 and 768: 2 and 3 whole 256-column tiles, 32 and 48 row groups; rows of 32-value blocks may end
# inside a tile: 352 = 11 blocks of 32 (a tile, then an odd block's pair, or 3 of MXFP4's 4), 416 = 13
CASES = [(t, 512, 768) for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.Q8_0, Q.Q4_0, Q.IQ4_NL, Q.MXFP4,
                                 *GRID_TYPES)]
CASES += [(t, 352, 416) for t in (Q.Q8_0, Q.Q4_0, Q.IQ4_NL, Q.MXFP4)]


@pytest.fixture(scope="module", params=CASES, ids=lambda p: f"{p[0].name}-{p[1]}x{p[2]}")
def packed_file(request, tmp_path_factory):
    qtype, D, F = request.param
    rng = np.random.default_rng(int(qtype) + D)
    path = write_experts_file(tmp_path_factory.mktemp("vnni") / f"{qtype.name}-{D}.gguf",
                              {0: random_experts(rng, E, D, F)}, qtype)
    return path, read_reference(path, 0), D, qtype


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_packed_experts_match_the_f64_reference_and_ggml(packed_file, kernels, tokens, dtype, rng):
    path, ref, D, qtype = packed_file
    packs(path, qtype)
    x = torch.randn(tokens, D).to(dtype)
    ids, w = routing(rng, tokens, 8, repeats=tokens % 2 == 1)
    expected = ref.forward(x.float().numpy(), ids, w)
    ours = run(lvgg.CpuMoE(lvgg.ExpertStore(path), threads=2), x, ids, w)
    ggml = run(lvgg.CpuMoE(lvgg.ExpertStore(path, own_kernels=False), threads=2), x, ids, w)
    assert rel_err(ours, expected) < TOLERANCE
    assert rel_err(ours, ggml) < TOLERANCE  # the same weights, activations quantized alike


def test_thread_counts_and_chunks_give_identical_results(packed_file, kernels, rng):
    """Work is split by rows, never inside a row's sum: results do not depend on threads or chunking.
    On ggml's kernels (the types a kernel set does not run) the kernel for a call depends on its
    rows: on the 2-core AVX2 box Q6_K (which ggml does not repack there) differed by up to 2e-4
    between chunks."""
    path, _, D, qtype = packed_file
    store = lvgg.ExpertStore(path)
    x = torch.from_numpy(rng.standard_normal((37, D), dtype=np.float32))
    ids, w = routing(rng, 37, 6, repeats=False)
    outs = [run(lvgg.CpuMoE(store, threads=t, chunk=c), x, ids, w) for t, c in ((1, 512), (2, 512), (2, 5))]
    assert np.array_equal(outs[0], outs[1]), "thread counts"
    if packs(path, qtype):
        assert np.array_equal(outs[0], outs[2]), "chunks"
    else:
        assert rel_err(outs[2], outs[0]) < 1e-3, "chunks"


@pytest.mark.parametrize("form", ["gate+up+down", "gate_up+down"])
def test_mixed_layer_packed_and_ggml_projections(tmp_path, form, kernels, rng):
    """Q4_K gate/up (packed, lvgg's kernels) with a Q5_0 down (ggml's kernels) in one layer."""
    experts = random_experts(rng, E, 256, 512, form)
    types = {proj: Q.Q5_0 if proj == "down" else Q.Q4_K for proj in experts}
    path = write_experts_file(tmp_path / "m.gguf", {0: experts}, types)
    store = lvgg.ExpertStore(path)
    if kernels != "none":
        assert store.layer_info(0).packed["down"] is False and store.layer_info(0).packed[form.split("+")[0]]
    assert not lvgg.experts.packs_every_expert(path)  # the header says as much (Q5_0 has no packed layout)
    x = torch.randn(6, 256)
    ids, w = routing(rng, 6, 4, repeats=True)
    out = run(lvgg.CpuMoE(store, threads=2), x, ids, w)
    assert rel_err(out, read_reference(path, 0).forward(x.numpy(), ids, w)) < TOLERANCE


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.IQ4_XS, Q.Q8_0, Q.MXFP4], ids=lambda q: q.name)
def test_numa_parts_of_packed_experts(tmp_path, qtype, kernels, rng):
    """Two virtual nodes (each part packed by its node's threads; 256-value block types: 512 and 256
    intermediate rows, Q8_0 and MXFP4: 384 each, which ends inside a tile): the parts sum to the whole
    layer."""
    path = write_experts_file(tmp_path / "n.gguf", {0: random_experts(rng, E, 256, 768)}, qtype)
    packed = lvgg.ExpertStore(path).part(1, 2).layer_info(0).packed.values()
    assert all(p == _bridge.packable(int(qtype), 16, 256) for p in packed)
    x = torch.randn(3, 256)
    ids, w = routing(rng, 3, 8, repeats=False)
    whole = run(lvgg.CpuMoE(lvgg.ExpertStore(path), threads=2), x, ids, w)
    parts = lvgg.CpuMoE(lvgg.ExpertStore(path, repack=False), nodes=[lvgg.EngineNode([0]), lvgg.EngineNode([1])])
    assert rel_err(run(parts, x, ids, w), whole.astype(np.float64)) < 1e-2
    assert rel_err(whole, read_reference(path, 0).forward(x.numpy(), ids, w)) < TOLERANCE


def test_q8_0_keeps_its_precision_next_to_outlier_activations(tmp_path, kernels, rng):
    """Q8_0's kernels take a scale per 32 activations, as ggml's do: a channel 100x larger than the
    rest (as LLM hidden states have) costs the other 224 values of its 256-block no precision."""
    path = write_experts_file(tmp_path / "o.gguf", {0: random_experts(rng, E, 512, 256)}, Q.Q8_0)
    x = torch.randn(4, 512)
    x[:, 7] *= 100.0
    ids, w = routing(rng, 4, 4, repeats=False)
    expected = read_reference(path, 0).forward(x.numpy(), ids, w)
    ours = rel_err(run(lvgg.CpuMoE(lvgg.ExpertStore(path), threads=2), x, ids, w), expected)
    ggml = rel_err(run(lvgg.CpuMoE(lvgg.ExpertStore(path, own_kernels=False), threads=2), x, ids, w), expected)
    assert ours < 2 * ggml + 1e-3, (ours, ggml)
