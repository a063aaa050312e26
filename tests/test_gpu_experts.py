"""GpuExperts: experts streamed to the GPU per call or resident there, against the f64 reference.

The GPU tests run on a machine with an NVIDIA GPU and vLLM's CUDA build (the project's GPU
machine); the checks of what is refused before any GPU work run everywhere.
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import lvgg
from lvgg import _bridge
from lvgg.gpu import experts as gpu_experts
from lvgg.gpu.dequant import packed_nbytes
from lvgg.gpu.experts import (GpuExperts, _host_views, estimate_vram_bytes, gpu_unsupported, layer_infos, reads_packed,
                              staged_bytes, stream_groups)
from lvgg.testing.expert_files import ReferenceLayer, random_experts, read_reference, write_experts_file

E, D, F, K = 16, 256, 512, 4
Q4_K_M = {"gate": Q.Q4_K, "up": Q.Q4_K, "gate_up": Q.Q4_K, "down": Q.Q6_K}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run on the GPU machine)")


def packs() -> bool:
    """This machine's CPU engine keeps lvgg's packed copies of Q4_K and Q6_K, which its GPU then reads."""
    return _bridge.packable(int(Q.Q4_K), 16, 256) and _bridge.packable(int(Q.Q6_K), 16, 256)


@pytest.fixture(scope="module")
def experts_file(tmp_path_factory):
    """Layers 1-3 gate+up+down, layer 5 fused gate_up, all Q4_K/Q6_K."""
    rng = np.random.default_rng(11)
    layers = {i: random_experts(rng, E, D, F) for i in (1, 2, 3)}
    layers[5] = random_experts(rng, E, D, F, form="gate_up+down")
    return write_experts_file(tmp_path_factory.mktemp("gpu") / "experts.gguf", layers, Q4_K_M)


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    """Layers 1 and 5 (fused gate_up) in Q8_0: 512 intermediate rows are 16 blocks of 32, which 3
    shares split unevenly (192, 160, 160 rows: a share's row of down is then 170 bytes)."""
    rng = np.random.default_rng(12)
    layers = {1: random_experts(rng, E, D, F), 5: random_experts(rng, E, D, F, form="gate_up+down")}
    return write_experts_file(tmp_path_factory.mktemp("gpu_q8") / "experts.gguf", layers,
                              dict.fromkeys(("gate", "up", "gate_up", "down"), Q.Q8_0))


def share_reference(path, layer: int, rows: tuple[int, int]) -> ReferenceLayer:
    """The f64 reference of a share of every expert: its intermediate rows [a, b)."""
    whole, (a, b) = read_reference(path, layer), rows
    return ReferenceLayer(whole.gate[:, a:b], whole.up[:, a:b], whole.down[:, :, a:b])


def routing(T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return x, ids, w


def rel_error(got: torch.Tensor, want: np.ndarray) -> float:
    got = got.double().cpu().numpy()
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@needs_cuda
@pytest.mark.parametrize("stream_group", [None, 6])  # whole layers; groups of 6, 6 and 4 experts
@pytest.mark.parametrize("repack", [False, True])  # the GPU reads the file, or the CPU engine's packed copy
def test_streamed_and_resident_layers_match_the_reference(experts_file, stream_group, repack):
    store = lvgg.ExpertStore(experts_file, repack=repack)
    gpu = GpuExperts(store, device="cuda", dtype=torch.bfloat16, streamed_layers=[1, 2, 5], resident_layers=[3],
                     stream_group=stream_group)
    assert gpu.reads_packed_copy == (repack and packs())
    refs = {layer: read_reference(experts_file, layer) for layer in (1, 2, 3, 5)}
    # in order, repeated, out of order, the same layer twice: every slot/prefetch path
    for step, layer in enumerate([1, 2, 3, 5, 1, 2, 5, 5, 2, 1, 3, 1]):
        T = (7, 64, 300)[step % 3]
        x, ids, w = routing(T, step)
        out = gpu(layer, x.to("cuda", torch.bfloat16), ids.cuda(), w.cuda())
        assert out.dtype == torch.bfloat16 and out.shape == (T, D)
        want = refs[layer].forward(x.to(torch.bfloat16).double().numpy(), ids.numpy(), w.double().numpy())
        assert rel_error(out, want) < 0.02, f"step {step} layer {layer}"
    assert gpu.host_pinned
    assert gpu.vram_bytes == estimate_vram_bytes({n: store.layer_info(n) for n in (1, 2, 3, 5)}, [1, 2, 5], [3],
                                                 torch.bfloat16, stream_group=stream_group)
    torch.cuda.synchronize()
    gpu.close()
    assert not gpu.host_pinned


@needs_cuda
@pytest.mark.parametrize("quantized", [True, False])  # kept as the file's bytes, or dequantized once
@pytest.mark.parametrize("repack", [False, True])
def test_resident_layers_match_the_reference(experts_file, quantized, repack):
    store = lvgg.ExpertStore(experts_file, repack=repack)
    gpu = GpuExperts(store, device="cuda", dtype=torch.bfloat16, resident_layers=[1, 5], quantized_resident=quantized)
    # up to RESIDENT_BYTES_MOST_TOKENS tokens multiply the bytes; more dequantize into shared weights
    for step, (layer, T) in enumerate([(1, 1), (5, 7), (1, 16), (5, 17), (1, 300), (5, 2)]):
        x, ids, w = routing(T, step)
        out = gpu(layer, x.to("cuda", torch.bfloat16), ids.cuda(), w.cuda())
        want = read_reference(experts_file, layer).forward(x.to(torch.bfloat16).double().numpy(), ids.numpy(),
                                                           w.double().numpy())
        assert rel_error(out, want) < 0.02, f"layer {layer}, {T} tokens"
    infos = {n: store.layer_info(n) for n in (1, 5)}
    assert gpu.vram_bytes == estimate_vram_bytes(infos, [], [1, 5], torch.bfloat16, quantized_resident=quantized)
    if quantized:  # a further resident layer adds its Q4_K_M bytes (the bf16 weights of longer passes are shared)
        def added(as_bytes):
            return (estimate_vram_bytes(infos, [], [1, 5], torch.bfloat16, quantized_resident=as_bytes)
                    - estimate_vram_bytes({1: infos[1]}, [], [1], torch.bfloat16, quantized_resident=as_bytes))
        assert added(True) < 0.35 * added(False)  # about 5.2 bits a weight against 16


@needs_cuda
@pytest.mark.parametrize("T", [16, 40])  # from the bytes; dequantized into the shared weights
def test_resident_layers_replay_in_a_cuda_graph(experts_file, T):
    gpu = GpuExperts(lvgg.ExpertStore(experts_file), device="cuda", dtype=torch.bfloat16, resident_layers=[2])
    x, ids, w = (t.cuda() for t in routing(T, 1))
    x = x.to(torch.bfloat16)
    eager = gpu(2, x, ids, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gpu(2, x, ids, w)
    graph.replay()
    assert torch.equal(captured, eager)


@needs_cuda
def test_streamed_layers_refuse_graph_capture(experts_file):
    gpu = GpuExperts(lvgg.ExpertStore(experts_file), device="cuda", dtype=torch.bfloat16, streamed_layers=[1])
    x, ids, w = (t.cuda() for t in routing(4, 2))
    gpu(1, x.to(torch.bfloat16), ids, w)  # warm up (Triton compiles outside the capture)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            gpu(1, x.to(torch.bfloat16), ids, w)
    torch.cuda.synchronize()
    gpu.close()


def test_layers_the_gpu_cannot_run_are_refused_before_any_gpu_work(tmp_path):
    rng = np.random.default_rng(3)
    path = write_experts_file(tmp_path / "mixed.gguf", {0: random_experts(rng, 4, 256, 256),
                                                        1: random_experts(rng, 4, 256, 256, form="up+down"),
                                                        2: random_experts(rng, 4, 256, 256, biased=True)},
                              {"gate": Q.TQ1_0, "up": Q.Q8_0, "down": Q.Q8_0})  # ternary: no GPU kernel
    store = lvgg.ExpertStore(path)
    assert "TQ1_0" in gpu_unsupported(store.layer_info(0))
    assert "up+down" in gpu_unsupported(store.layer_info(1))
    assert "experts with biases (gpt-oss" in gpu_unsupported(store.layer_info(2))  # they stay on the CPU
    with pytest.raises(ValueError, match=r"layer 0 of .* cannot run on the GPU: types \['TQ1_0'\]"):
        GpuExperts(store, device="cuda", dtype=torch.bfloat16, streamed_layers=[0])
    with pytest.raises(ValueError, match="layers \\[1\\] are both streamed and resident"):
        GpuExperts(store, device="cuda", dtype=torch.bfloat16, streamed_layers=[1], resident_layers=[1])


@pytest.mark.parametrize("repack", [False, True])
def test_vram_estimate_counts_two_staging_slots_one_streamed_layer_and_each_resident_one(experts_file, repack):
    store = lvgg.ExpertStore(experts_file, repack=repack)
    infos = {n: store.layer_info(n) for n in store.layers}
    weights = 3 * E * D * F * 2  # bf16
    # the GPU reads the CPU engine's packed copy where it has one (lvgg's kernels, AVX-512 VNNI), else the file
    if repack and packs():
        assert all(info.packed and all(info.packed.values()) for info in infos.values())
        staged = E * (packed_nbytes("Q4_K", 2 * F, D) + packed_nbytes("Q6_K", D, F))
    else:
        assert not any(info.twins for info in infos.values())
        staged = 2 * (E * F * D // 256 * 144) + E * D * F // 256 * 210  # Q4_K gate, up; Q6_K down
    assert estimate_vram_bytes(infos, [], [1, 2], torch.bfloat16, quantized_resident=False) == 2 * weights
    assert estimate_vram_bytes(infos, [1, 2], [3], torch.bfloat16, quantized_resident=False) == 2 * weights + 2 * staged
    assert estimate_vram_bytes(infos, [1], [], torch.float32) == 2 * weights + 2 * staged
    # quantized resident layers: their bytes, and one layer of weights for longer passes (the
    # streamed layers' where they hold whole layers, else one of their own)
    aligned = staged_bytes(infos[1])
    assert staged <= aligned < staged + 1024
    assert estimate_vram_bytes(infos, [], [1, 2], torch.bfloat16) == 2 * aligned + weights
    assert estimate_vram_bytes(infos, [1, 2], [3], torch.bfloat16) == weights + 2 * staged + aligned
    assert estimate_vram_bytes(infos, [1, 2], [3], torch.bfloat16, stream_group=6) == \
        weights * 6 // E + 2 * staged_bytes(infos[1], 6) + aligned + weights


@pytest.mark.parametrize("n_parts,by", [(1, "rows"), (3, "rows"), (2, "experts")])
def test_the_gpu_reads_the_cpu_engines_packed_copy_where_it_has_one(experts_file, n_parts, by):
    """What the GPU reads of a repacked store, or of a tensor-parallel rank's part (3 parts: rows
    [160, 320) of 512 have down's lead of 160 in its 2 whole Q6_K blocks; 2 parts by experts: an
    expert-parallel rank's, the second numbered from expert E/2), is the CPU engine's packed copy
    (gate and up as one): the packer's output of the file's bytes of the same share. A share of a
    whole store reads the file."""
    plain = lvgg.ExpertStore(experts_file, repack=False)
    host = torch.from_numpy(np.fromfile(experts_file, dtype=np.uint8))
    for part in range(n_parts):
        store = lvgg.ExpertStore(experts_file) if n_parts == 1 else plain.part(part, n_parts, by=by)
        for layer in (1, 5):
            info = layer_infos(store)[layer]
            assert reads_packed(info) == packs() == bool(info.twins), (part, layer)
            if not packs():
                continue
            rows, columns, (lo, hi) = plain.part_shape(layer, part, n_parts, by)
            assert (info.intermediate_size, info.down_columns, info.down_lead) == \
                (rows[1] - rows[0], columns[1] - columns[0], rows[0] - columns[0])
            assert (info.first_expert, info.n_experts) == (lo, hi - lo)
            # the file's bytes of the share, expert by expert: gate rows then up rows, and down's columns
            in_file = [torch.cat([v.reshape(E, -1) for v in views], dim=1)[lo:hi].numpy()
                       for views in _host_views(host, plain.layer_info(layer), rows, columns)]
            in_file = [np.concatenate(in_file[:-1], axis=1), in_file[-1]]
            rows_and_columns = gpu_experts._share_of(store, layer, (0, 1), by)[1:3]
            views = _host_views(None, store.layer_info(layer), *rows_and_columns)
            assert [p for p, _ in gpu_experts._gpu_layout(info)] == ["gate_up", "down"] and len(views) == 2
            shapes = ((2 * info.intermediate_size, D, "Q4_K"), (D, info.down_columns, "Q6_K"))
            for (rows_, cols, qtype), raw, (view,) in zip(shapes, in_file, views):
                packed = np.empty((hi - lo, packed_nbytes(qtype, rows_, cols)), dtype=np.uint8)
                _bridge.pack(_bridge.type_from_name(qtype), rows_, cols, np.ascontiguousarray(raw), packed)
                assert np.array_equal(view.reshape(hi - lo, -1).numpy(), packed), (part, layer, qtype)
            assert info.nbytes == sum(view.numel() for view, in views)
    assert not layer_infos(lvgg.ExpertStore(experts_file), (0, 2))[1].twins


def test_streamed_groups_are_as_even_as_whole_experts_allow():
    assert stream_groups(16, None) == [range(16)]
    assert stream_groups(16, 6) == [range(0, 6), range(6, 12), range(12, 16)]
    assert stream_groups(128, 100) == [range(0, 64), range(64, 128)]
    assert stream_groups(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="at least one expert, found 0"):
        stream_groups(16, 0)


def model_layer_infos(n_layers, E, D, F, types):
    """ExpertLayerInfo of a model's layers, as a store reports them (offsets as one file would)."""
    from lvgg.experts import ExpertLayerInfo

    return {i: ExpertLayerInfo(index=i, n_experts=E, hidden_size=D, intermediate_size=F, form="gate+up+down",
                               biased=False, types=types, repacked={}, packed={},
                               offsets={"gate": 0, "up": 0, "down": 0}, nbytes=0, first_expert=0, routed_experts=E,
                               down_columns=F, down_lead=0)
            for i in range(n_layers)}


def test_gpu_plan_streams_what_fits_and_fills_auto_resident_layers():
    from lvgg.plan import SPLIT_EXPERTS, plan_gpu_layers
    from lvgg.vllm_plugin.settings import GpuSettings

    q4_k_m = {"gate": "q4_K", "up": "q4_K", "down": "q6_K"}
    a3b = model_layer_infos(48, 128, 2048, 768, q4_k_m)  # Qwen3-30B-A3B
    layer = 3 * 128 * 2048 * 768 * 2  # bf16 weights of one layer
    plan = plan_gpu_layers(a3b, GpuSettings(64, (), None, 3), 80 * 2**30, torch.bfloat16)
    assert (plan.streamed, plan.resident, plan.split, plan.stream_group, plan.notes) == \
        (list(range(48)), [], list(range(48)), None, [])
    assert plan.vram_bytes == estimate_vram_bytes(a3b, plan.streamed, [], torch.bfloat16, plan.split, SPLIT_EXPERTS)
    plan = plan_gpu_layers(a3b, GpuSettings(64, "auto", None, "auto"), 80 * 2**30, torch.bfloat16)
    assert plan.resident == list(range(48)) and plan.streamed == plan.split == []  # bf16 weights: 31 layers
    # half of a 20 GiB GPU: about 3x the layers their bf16 weights would fill
    plan = plan_gpu_layers(a3b, GpuSettings(64, "auto", None, "auto"), 20 * 2**30, torch.bfloat16)
    streamed, resident, split = plan.streamed, plan.resident, plan.split
    stream = estimate_vram_bytes(a3b, [0], [], torch.bfloat16, [0], SPLIT_EXPERTS)
    assert len(resident) >= 2.8 * ((10 * 2**30 - stream) // layer) and resident == list(range(len(resident)))
    assert streamed == split == list(range(len(resident), 48))
    one_more = resident + streamed[:1]
    assert estimate_vram_bytes(a3b, streamed[1:], one_more, torch.bfloat16, streamed[1:], SPLIT_EXPERTS) > 10 * 2**30
    plan = plan_gpu_layers(a3b, GpuSettings(64, "auto", None, None), 80 * 2**30, torch.bfloat16)
    assert plan.split == [] and len(plan.resident) >= len(resident)
    with pytest.raises(ValueError, match="3 resident expert layers need 2.2 GiB of VRAM; LVGG_GPU_EXPERTS_GB allows 2.0"):
        plan_gpu_layers(a3b, GpuSettings(None, (0, 1, 2), 2 * 2**30, None), 80 * 2**30, torch.bfloat16)
    # DeepSeek-V3-sized layers: streaming a whole one needs ~37 GiB; on a 40 GiB GPU (10 GiB for
    # streaming) prefill streams them in 4 groups of 64 experts, and splitting decode steps (the
    # bytes of 32 experts: 0.85 GiB) fits in what is left
    v3 = model_layer_infos(58, 256, 7168, 2048, q4_k_m)
    plan = plan_gpu_layers(v3, GpuSettings(64, (), None, 3), 40 * 2**30, torch.bfloat16)
    assert plan.streamed == plan.split == list(range(58)) and plan.resident == [] and plan.stream_group == 64
    assert len(plan.notes) == 1 and "streams them 64 of 256 experts at a time" in plan.notes[0]
    group_bytes = estimate_vram_bytes(v3, [0], [], torch.bfloat16, stream_group=64)
    assert group_bytes <= 10 * 2**30 < estimate_vram_bytes(v3, [0], [], torch.bfloat16, stream_group=86)
    plan = plan_gpu_layers(v3, GpuSettings(64, (), 40 * 2**30, "auto"), 40 * 2**30, torch.bfloat16)
    assert plan.streamed == plan.split == list(range(58)) and plan.stream_group is None and plan.notes == []
    plan = plan_gpu_layers(v3, GpuSettings(64, (), 2**27, "auto"), 40 * 2**30, torch.bfloat16)  # not one expert
    assert plan.streamed == plan.split == [] and "even one expert at a time" in plan.notes[0]
    assert "decode runs the experts on the CPU" in plan.notes[1]
    ternary = model_layer_infos(2, 8, 256, 256, {"gate": "tq1_0", "up": "tq1_0", "down": "q8_0"})
    plan = plan_gpu_layers(ternary, GpuSettings(64, (), None, 3), 80 * 2**30, torch.bfloat16)
    assert plan.streamed == plan.split == [] and "run on the CPU only" in plan.notes[0]
    with pytest.raises(ValueError, match=r"layers \[1\] cannot be resident: layer 1: types \['TQ1_0'\]"):
        plan_gpu_layers(ternary, GpuSettings(64, (1,), None), 80 * 2**30, torch.bfloat16)
    # a pipeline stage holding layers 24-47 keeps those of the listed layers it holds
    second = {i: info for i, info in a3b.items() if i >= 24}
    plan = plan_gpu_layers(second, GpuSettings(None, (0, 1, 30), None, None), 80 * 2**30, torch.bfloat16,
                           elsewhere=frozenset(range(24)))
    assert plan.resident == [30]
    with pytest.raises(ValueError, match=r"layers \[48\] cannot be resident: layer 48: no routed experts"):
        plan_gpu_layers(second, GpuSettings(None, (30, 48), None, None), 80 * 2**30, torch.bfloat16,
                        elsewhere=frozenset(range(24)))


def test_split_slots_follow_the_calibrated_token_counts():
    from lvgg.gpu.split import best_slots, slots_for

    # 1 token: 20% faster with 2 on the GPU; 2 tokens: 11%; 4 tokens: 3% (within the margin); 8: slower;
    # 16: 4 is fastest, but 3 is within 3% of it (fewer GPU experts win a near tie); 6% over the CPU alone
    seconds = {1: [0.50, 0.45, 0.40, 0.42], 2: [0.9, 0.8, 1.0], 4: [1.5, 1.455], 8: [2.7, 3.5],
               16: [2.06, 2.09, 2.05, 1.947, 1.935]}
    slots = best_slots(seconds)
    assert slots == {1: 2, 2: 1, 4: 0, 8: 0, 16: 3}
    assert [slots_for(slots, n) for n in (1, 2, 3, 4, 8, 9, 17)] == [2, 1, 0, 0, 0, 3, 0]
    assert [slots_for({10: 3}, n) for n in (1, 10, 11)] == [3, 3, 0]


def test_split_shares_stop_where_the_gpu_fetches_its_most():
    from lvgg.gpu.split import split_shares

    # 30B-A3B, 32 experts fetched per call: 8 tokens have ~52 distinct experts (5/8 of them: 32),
    # 16 tokens ~82 (4/8: 41, clamped to 32)
    assert [split_shares(n, 8, 128, 32) for n in (1, 8, 16)] == [range(1, 8), range(1, 6), range(1, 5)]
    assert split_shares(8, 4, 16, 8) == range(1, 4)
    # an expert-parallel rank holding half of them meets half the distinct experts: more shares are worth timing
    assert split_shares(16, 8, 128, 32, held=64) == range(1, 8)


@pytest.fixture(scope="module", params=[False, True], ids=["file", "repacked"])
def split(experts_file, request):
    """A decode split whose GPU reads the file, or the CPU engine's packed copy where it has one."""
    from lvgg.gpu.split import SplitExperts

    store = lvgg.ExpertStore(experts_file, repack=request.param)
    gpu = GpuExperts(store, device="cuda", dtype=torch.bfloat16, resident_layers=[3], split_layers=[1, 2, 5],
                     split_experts=8)  # 3 of 4 of 8 tokens' ~14 distinct experts is more: the CPU keeps the rest
    assert gpu.reads_packed_copy == (request.param and packs())
    moe = lvgg.CpuMoE(store, threads=2, max_top_k=K)
    cpu = lvgg.CudaExperts(moe, hidden_size=D, top_k=K, max_tokens=8, dtype=torch.bfloat16)
    split = SplitExperts(gpu, cpu, slots={2: 1, 8: 3})
    yield split
    torch.cuda.synchronize()
    cpu.close()
    gpu.close()


@needs_cuda
def test_decode_split_matches_the_reference(experts_file, split):
    refs = {layer: read_reference(experts_file, layer) for layer in (1, 2, 5)}
    assert split.takes(1, 8) and not split.takes(1, 9) and not split.takes(3, 1)
    assert [split.gpu_slots(n) for n in (1, 2, 3, 8)] == [1, 1, 3, 3]
    for step, (layer, T) in enumerate([(1, 1), (2, 8), (5, 3), (1, 8), (5, 1)]):
        x, ids, w = routing(T, 100 + step)
        ids[0, 2:] = ids[0, 0]  # an expert repeated within a token (the GPU's or the CPU's) and across tokens
        ids[-1, 1] = ids[0, 1]
        out = split(layer, x.to("cuda", torch.bfloat16), ids.cuda(), w.cuda())
        want = refs[layer].forward(x.to(torch.bfloat16).double().numpy(), ids.numpy(), w.double().numpy())
        assert out.shape == (T, D) and rel_error(out, want) < 0.02, f"step {step} layer {layer}"
    # a CUDA graph's padded batch: 3 real rows of 8; both sides leave the padding out
    x, ids, w = routing(8, 110)
    out = split(2, x.to("cuda", torch.bfloat16), ids.cuda(), w.cuda(), torch.tensor([3], dtype=torch.int32).cuda())
    want = refs[2].forward(x[:3].to(torch.bfloat16).double().numpy(), ids[:3].numpy(), w[:3].double().numpy())
    assert rel_error(out[:3], want) < 0.02 and not out[3:].any(), "padding rows come back 0"


@needs_cuda
def test_decode_split_replays_in_a_cuda_graph(split):
    x, ids, w = (t.cuda() for t in routing(4, 7))
    x = x.to(torch.bfloat16)
    split(2, x, ids, w)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = split(2, x, ids, w)
    for seed in (8, 9):  # new inputs into the captured tensors
        nx, nids, nw = (t.cuda() for t in routing(4, seed))
        x.copy_(nx.to(torch.bfloat16)), ids.copy_(nids), w.copy_(nw)
        graph.replay()
        eager = split(2, x, ids, w)
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), f"seed {seed}"


@needs_cuda
def test_decode_split_counts_the_bytes_it_fetches(split):
    """A counting split adds up the experts each call fetches over the link, in CUDA graph replays
    too, where no Python runs: what lvgg:pcie_bytes_total{path="gpu_split"} shows."""
    from lvgg.gpu.experts import link_bytes
    from lvgg.gpu.split import SplitExperts

    from prometheus_client import REGISTRY

    from lvgg.vllm_plugin.metrics import process_metrics

    counting = SplitExperts(split.gpu, split.cpu, slots={8: 3}, count_fetches=True)
    metrics = process_metrics(split.cpu.moe.call_stats()["bounds"])
    metrics.gpu_made(0, counting)
    x, ids, w = (t.cuda() for t in routing(8, 21))
    x = x.to(torch.bfloat16)
    fetched = int((counting.route(ids)[1] >= 0).sum()) * link_bytes(split.gpu.layer_info(5), 1)
    assert fetched > 0 and counting.fetched_bytes() == 0
    counting(5, x, ids, w)
    torch.cuda.synchronize()
    assert counting.fetched_bytes() == fetched
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        counting(5, x, ids, w)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert counting.fetched_bytes() == 3 * fetched  # the eager call and two replays (a capture runs nothing)
    before = REGISTRY.get_sample_value("lvgg:pcie_bytes_total", {"path": "gpu_split"}) or 0
    metrics.flush()
    assert REGISTRY.get_sample_value("lvgg:pcie_bytes_total", {"path": "gpu_split"}) - before == 3 * fetched
    assert REGISTRY.get_sample_value("lvgg:decode_split_gpu_experts", {"tokens": "8"}) == 3
    assert split.fetched_bytes() == 0, "a split made without count_fetches counts nothing"


@needs_cuda
def test_decode_split_calibration_times_both_sides(split):
    from lvgg.gpu.split import best_slots, calibrate

    seconds = calibrate(split.gpu, split.cpu, token_counts=(1, 8), repeats=2)
    assert len(seconds[1]) == len(seconds[8]) == K  # the CPU alone, then GPU shares 1..K-1
    assert all(t > 0 for times in seconds.values() for t in times)
    assert set(best_slots(seconds)) == {1, 8}


@needs_cuda
def test_an_expert_parallel_ranks_calibration_routes_over_every_expert(experts_file):
    """Rank 1 of 2 holds experts 8..15: calibration's routes run over all 16, as the router's do
    (routes over 0..7 alone would leave both sides nothing to compute)."""
    from lvgg.gpu.split import calibrate, split_shares

    store = lvgg.ExpertStore(experts_file, repack=False)  # parts are made from plain tensors
    gpu = GpuExperts(store, device="cuda", dtype=torch.bfloat16, split_layers=[1, 2], split_experts=8, part=(1, 2),
                     by="experts")
    cpu = lvgg.CudaExperts(lvgg.CpuMoE(store.part(1, 2, by="experts"), threads=2, max_top_k=K), hidden_size=D,
                           top_k=K, max_tokens=8, dtype=torch.bfloat16)
    try:
        seconds = calibrate(gpu, cpu, token_counts=(1, 8), repeats=2)
        assert len(seconds[8]) == 1 + len(split_shares(8, K, E, 8, held=E // 2))
        assert all(t > 0 for times in seconds.values() for t in times)
    finally:
        torch.cuda.synchronize()
        cpu.close()
        gpu.close()


# (file, shares, split): Q4_K_M in 2 shares of whole blocks and in 3 that pad down's blocks; Q8_0
# in 3; Q4_K_M in 2 of whole experts
SHARES = [("k", 2, "rows"), ("k", 3, "rows"), ("q8", 3, "rows"), ("k", 2, "experts")]


def share_output(path, store, layer, share, by, x, ids, w):
    """The f64 output of share ``share`` = (index, count) of a layer, for float64/int numpy inputs:
    of its rows of every expert, or of its whole experts (slots routed elsewhere add nothing)."""
    if by == "experts":
        lo, hi = store.expert_range(layer, *share)
        return read_reference(path, layer).forward(x, np.where((ids >= lo) & (ids < hi), ids, -1), w)
    return share_reference(path, layer, store.part_rows(layer, *share, by)).forward(x, ids, w)


@pytest.mark.parametrize("kind,n_parts", [share[:2] for share in SHARES if share[2] == "rows"])
def test_a_shares_bytes_in_the_file_are_the_rows_its_cpu_part_holds(experts_file, q8_file, kind, n_parts):
    """What a tensor-parallel rank's GPU reads of the file (rows [a, b) of gate and up, the whole
    blocks of down around them), dequantized by gguf-py, is the reference's; the shares tile the
    layer as the CPU parts do."""
    import gguf

    path, block = (experts_file, 256) if kind == "k" else (q8_file, 32)
    store = lvgg.ExpertStore(path, repack=False)
    host = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    for layer in (1, 5):
        whole, ends = store.layer_info(layer), [0]
        for part in range(n_parts):
            a, b = store.part_rows(layer, part, n_parts)
            assert a == ends[-1] and b - a == layer_infos(store, (part, n_parts))[layer].intermediate_size == \
                store.part(part, n_parts, repack=False).layer_info(layer).intermediate_size
            ends.append(b)
            ref, (c0, c1) = read_reference(path, layer), store.part_shape(layer, part, n_parts)[1]
            assert (c0, c1) == (a // block * block, -(-b // block) * block)
            want = {"gate": ref.gate[:, a:b], "up": ref.up[:, a:b], "down": ref.down[:, :, c0:c1]}
            want["gate_up"] = np.concatenate([want["gate"], want["up"]], axis=1)
            views = _host_views(host, whole, (a, b), (c0, c1))
            projections = ["gate", "up", "down"] if whole.form == "gate+up+down" else ["gate_up", "down"]
            for projection, pieces in zip(projections, views):
                raw = torch.cat([v.reshape(E, -1) for v in pieces], dim=1).numpy()
                qtype = Q[whole.types[projection].upper()]
                values = gguf.quants.dequantize(raw.reshape(-1, pieces[0].shape[-1]), qtype)
                assert np.array_equal(values.reshape(want[projection].shape), want[projection]), \
                    (layer, part, projection)
        assert ends[-1] == F and len(set(np.diff(ends))) <= 2, ends


def test_an_expert_parallel_share_is_its_whole_experts(experts_file):
    store = lvgg.ExpertStore(experts_file, repack=False)
    whole, share = store.layer_info(1), layer_infos(store, (1, 2), "experts")[1]
    assert (share.first_expert, share.n_experts, share.routed_experts) == (E // 2, E // 2, E)
    assert (share.intermediate_size, share.down_columns, share.nbytes) == (F, F, whole.nbytes // 2)
    assert share.nbytes == store.part(1, 2, repack=False, by="experts").layer_info(1).nbytes


@needs_cuda
@pytest.mark.parametrize("kind,n_parts,by,source", [(*share, "file") for share in SHARES] +
                         [(*share, "copy") for share in SHARES if packs()])
def test_tensor_parallel_shares_compute_their_rows_and_sum_to_the_layer(experts_file, q8_file, kind, n_parts, by,
                                                                       source):
    """A rank's GpuExperts (streamed whole and in groups, resident, and split with the rank's CPU
    part in decode steps) computes the share its CPU part holds, rows of every expert or whole
    experts (expert parallel), read from the whole file or ("copy") from the CPU part's packed
    copy where it has one; the ranks' outputs sum to the layer."""
    from lvgg.gpu.split import SplitExperts

    path = experts_file if kind == "k" else q8_file
    store = lvgg.ExpertStore(path, repack=False)
    x, ids, w = routing(64, 3)
    xd, idsd, wd = routing(4, 4)
    xb, xdb = x.to(torch.bfloat16), xd.to(torch.bfloat16)
    sums: dict[str, dict[int, torch.Tensor]] = {"prefill": {}, "decode": {}}
    for part in range(n_parts):
        share = (part, n_parts)
        cpu_part = store.part(part, n_parts, by=by)
        moe = lvgg.CpuMoE(cpu_part, threads=2, max_top_k=K)
        cpu = lvgg.CudaExperts(moe, hidden_size=D, top_k=K, max_tokens=8, dtype=torch.bfloat16)
        read, read_part = (store, share) if source == "file" else (cpu_part, (0, 1))
        gpus = [GpuExperts(read, device="cuda", dtype=torch.bfloat16, streamed_layers=[1], resident_layers=[5],
                           stream_group=group, part=read_part, by=by) for group in (None, 6)]
        split_gpu = GpuExperts(read, device="cuda", dtype=torch.bfloat16, split_layers=[1, 5], split_experts=8,
                               part=read_part, by=by)
        split = SplitExperts(split_gpu, cpu, slots={8: 2})
        assert all(gpu.host_pinned and gpu.reads_packed_copy == (source == "copy" and packs())
                   for gpu in (*gpus, split_gpu)), "three readers of the same pinned memory"
        assert gpus[0].vram_bytes == estimate_vram_bytes(layer_infos(read, read_part, by), [1], [5], torch.bfloat16)
        for layer in (1, 5):
            want = share_output(path, store, layer, share, by, xb.double().numpy(), ids.numpy(), w.double().numpy())
            for gpu in gpus:
                out = gpu(layer, xb.cuda(), ids.cuda(), w.cuda())
                assert rel_error(out, want) < 0.02, (share, layer, gpu.streamed_layers)
            sums["prefill"][layer] = sums["prefill"].get(layer, 0) + out.double().cpu()
            out = split(layer, xdb.cuda(), idsd.cuda(), wd.cuda())
            want = share_output(path, store, layer, share, by, xdb.double().numpy(), idsd.numpy(),
                                wd.double().numpy())
            assert rel_error(out, want) < 0.02, (share, layer, "split")
            sums["decode"][layer] = sums["decode"].get(layer, 0) + out.double().cpu()
        torch.cuda.synchronize()
        cpu.close()
        address = split_gpu._host_ranges[0][0]
        for gpu in (*gpus, split_gpu):
            assert address in gpu_experts._pin_users, "pinned while a reader is open"
            gpu.close()
        assert address not in gpu_experts._pin_users, "unpinned with the last reader"
    for layer in (1, 5):
        ref = read_reference(path, layer)
        assert rel_error(sums["prefill"][layer], ref.forward(xb.double().numpy(), ids.numpy(),
                                                             w.double().numpy())) < 0.02, layer
        assert rel_error(sums["decode"][layer], ref.forward(xdb.double().numpy(), idsd.numpy(),
                                                            wd.double().numpy())) < 0.02, layer
