"""CudaExperts: CUDA tensors in and out, the CPU engine in stream order, CUDA graph capture.

The GPU tests run on a machine with an NVIDIA GPU (the project's GPU machine); the first test
runs everywhere and checks what a machine without a driver gets.
"""
import mmap
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import lvgg
from lvgg import _bridge
from lvgg.gpu.bridge import register_host, unregister_host
from lvgg.testing.expert_files import random_experts, read_reference, write_experts_file

E, D, F, K = 16, 256, 512, 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run on the GPU machine)")


@pytest.fixture(scope="module")
def experts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "experts.gguf"
    rng = np.random.default_rng(5)
    return write_experts_file(path, {0: random_experts(rng, E, D, F), 3: random_experts(rng, E, D, F)}, Q.Q8_0)


def routing(T, device, seed=0, ids_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(ids_dtype)
    w = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return x.to(device), ids.to(device), w.to(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without an NVIDIA driver")
def test_without_a_driver_the_bridge_says_what_it_needs(experts_file):
    moe = lvgg.CpuMoE(lvgg.ExpertStore(experts_file), threads=1)
    bufs = [torch.zeros(8, D), torch.zeros(8, K, dtype=torch.int32), torch.zeros(8, K), torch.zeros(8, D)]
    with pytest.raises(RuntimeError, match="needs the NVIDIA driver"):
        _bridge.CudaBridge(moe._engine, *bufs)


def test_an_unknown_signal_is_refused(experts_file):
    moe = lvgg.CpuMoE(lvgg.ExpertStore(experts_file), threads=1)
    with pytest.raises(ValueError, match=r"signal must be one of \('flags', 'host_function'\), found 'poll'"):
        lvgg.CudaExperts(moe, hidden_size=D, top_k=K, max_tokens=8, dtype=torch.bfloat16, signal="poll")


@pytest.fixture(scope="module", params=["flags", "host_function"])
def bridge(experts_file, request):
    moe = lvgg.CpuMoE(lvgg.ExpertStore(experts_file), max_tokens=256)
    experts = lvgg.CudaExperts(moe, hidden_size=D, top_k=K, max_tokens=256, dtype=torch.bfloat16,
                               signal=request.param)
    assert experts.signal == request.param  # the GPU machine's driver has stream memory operations
    yield moe, experts
    torch.cuda.synchronize()
    experts.close()


@needs_cuda
@pytest.mark.parametrize("T", [1, 7, 256])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_cuda_tensors_give_the_cpu_result(bridge, T, ids_dtype):
    moe, experts = bridge
    x, ids, w = routing(T, "cuda", seed=T, ids_dtype=ids_dtype)
    out = experts(3, x, ids, w)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16 and out.shape == (T, D)
    cpu = moe(3, x.cpu(), ids.cpu(), w.cpu())
    assert torch.equal(out.cpu(), cpu)


@needs_cuda
def test_layers_in_a_row_use_their_own_experts(bridge, experts_file):
    _, experts = bridge
    x, ids, w = routing(5, "cuda", seed=1)
    h = experts(0, x, ids, w)
    h = experts(3, h, ids, w)  # depends on the first layer's result through the stream
    ref = read_reference(experts_file, 0).forward(x.cpu().float().numpy(), ids.cpu().numpy(), w.cpu().numpy())
    ref = read_reference(experts_file, 3).forward(ref, ids.cpu().numpy(), w.cpu().numpy())
    err = np.linalg.norm(h.cpu().double().numpy() - ref) / np.linalg.norm(ref)
    assert err < 5e-2  # Q8_0 twice, bf16 in between


@needs_cuda
def test_graph_replay_equals_eager_with_new_inputs(bridge):
    moe, experts = bridge
    x, ids, w = routing(4, "cuda", seed=2)
    experts(3, x, ids, w)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = experts(3, x, ids, w)
        z = y * 2 + 1  # GPU work after the layer sees its result
    for seed in (3, 4):
        nx, nids, nw = routing(4, "cuda", seed=seed)
        x.copy_(nx), ids.copy_(nids), w.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        eager = experts(3, nx, nids, nw)
        assert torch.equal(y, eager)
        assert torch.equal(z, eager * 2 + 1)


@needs_cuda
def test_counted_calls_leave_the_padding_rows_out_graph_replays_included(bridge):
    moe, experts = bridge
    x, ids, w = routing(6, "cuda", seed=6)
    full = moe(3, x.cpu(), ids.cpu(), w.cpu())
    real_rows = torch.zeros(1, dtype=torch.int32, device="cuda")
    experts(3, x, ids, w, real_rows=real_rows)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = experts(3, x, ids, w, real_rows=real_rows)
    ids[4:] = E + 9  # padding rows hold anything, out-of-range ids too: they are never read
    for real in (4, 0, 1):
        real_rows.fill_(real)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y[:real].cpu(), full[:real]) and not y[real:].any(), f"{real} real rows"
        experts.check()
    ids[4:] = ids[:2]
    for real in (6, -1, 99):  # not a count of padded rows: every row is computed
        real_rows.fill_(real)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y.cpu(), moe(3, x.cpu(), ids.cpu(), w.cpu())), f"real_rows={real}"


@needs_cuda
def test_bad_ids_poison_the_output_and_raise_at_the_next_call(bridge):
    _, experts = bridge
    x, ids, w = routing(2, "cuda", seed=5)
    ids[1, 0] = E + 3
    out = experts(3, x, ids, w)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()
    with pytest.raises(RuntimeError, match="CPU experts failed in a job of the CUDA bridge"):
        experts.check()
    experts.check()  # reported once


@needs_cuda
def test_bad_calls_are_refused_before_anything_is_enqueued(bridge):
    _, experts = bridge
    x, ids, w = routing(3, "cuda")
    with pytest.raises(TypeError, match="takes CUDA tensors"):
        experts(3, x.cpu(), ids, w)
    with pytest.raises(ValueError, match=r"topk_ids must be \[tokens, 4\]"):
        experts(3, x, ids[:, :2], w)
    with pytest.raises(ValueError, match="takes 1..256"):
        experts(3, *routing(300, "cuda"))
    with pytest.raises(ValueError, match=r"real_rows must be one int32 on a CUDA device, found torch.int64"):
        experts(3, x, ids, w, real_rows=torch.tensor([2], device="cuda"))
    with pytest.raises(IndexError):
        experts(2, x, ids, w)  # no MoE layer 2 in the file


@needs_cuda
def test_the_bridge_thread_computes_on_its_engines_first_cpu(experts_file):
    """The thread that serves the stream's requests computes as the engine's first worker (ggml's
    pool runs the others): with the engine on given CPUs it runs on the first one's, not anywhere."""
    from pathlib import Path

    cpus = sorted(os.sched_getaffinity(0))[-2:]
    moe = lvgg.CpuMoE(lvgg.ExpertStore(experts_file), threads=2, cpus=cpus, strict_cpu=True)
    experts = lvgg.CudaExperts(moe, hidden_size=D, top_k=K, max_tokens=8, dtype=torch.bfloat16, signal="flags")
    try:
        want = [] if _bridge.openmp else [cpus[0]]
        assert moe._engine.caller_cpus == want
        threads = [t for t in Path("/proc/self/task").iterdir() if (t / "comm").read_text().strip() == "lvgg-bridge"]
        assert len(threads) == 1
        allowed = os.sched_getaffinity(int(threads[0].name))
        assert allowed == set(want or os.sched_getaffinity(0))
        out = experts(3, *routing(4, "cuda"))  # and it computes from there
        assert torch.isfinite(out).all()
    finally:
        torch.cuda.synchronize()
        experts.close()


def test_pinning_checks_its_range_before_the_driver():
    with pytest.raises(ValueError, match="expected a non-null address and a size above 0, found 0 bytes"):
        _bridge.register_host_memory(4096, 0, 0)


@needs_cuda
def test_a_failed_pin_raises_and_leaves_no_cuda_error_behind():
    # The runtime's cudaHostRegister leaves a failure as its last error, which torch's next kernel
    # launch raises; through the driver the failure is ours alone.
    pages = torch.frombuffer(mmap.mmap(-1, 4 * mmap.PAGESIZE), dtype=torch.uint8)
    register_host(pages.data_ptr(), pages.numel(), 0)
    try:
        assert pages.is_pinned()
        with pytest.raises(RuntimeError, match=r"cuMemHostRegister failed: .*\(error 712\)"):
            register_host(pages.data_ptr(), pages.numel(), 0)  # CUDA registers a range once
        assert (torch.arange(4, device="cuda") * 2).sum().item() == 12
    finally:
        unregister_host(pages.data_ptr())
    assert not pages.is_pinned()
