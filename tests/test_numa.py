"""One engine per (virtual) NUMA node, each on its share of every expert, against one engine.

Nodes here are unbound thread groups or CPU sets of this machine: the code paths of a
multi-node machine (parts, per-node pools, summing) run on any machine. Page placement is
checked with move_pages(2) for whatever nodes the machine has.
"""
import ctypes
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import lvgg
from lvgg.testing.expert_files import random_experts, read_reference, write_experts_file
from lvgg.topology import read_machine

E, D = 8, 256
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
         Q.IQ4_XS, Q.IQ4_NL]


def block(qtype):
    return 256 if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS) else 32


def routing(rng, T, K=4):
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32))
    ids[::3, -1] = -1  # some slots without an expert
    w = torch.from_numpy(rng.random((T, K)).astype(np.float32))
    return x, ids, w


def unbound(n):
    return [lvgg.EngineNode((), threads=1) for _ in range(n)]


@pytest.fixture(scope="module", params=TYPES, ids=lambda q: q.name)
def odd_file(request, tmp_path_factory):
    """Intermediate size 5 blocks: not a multiple of nodes x block for 2, 3 or 4 nodes."""
    qtype = request.param
    rng = np.random.default_rng(int(qtype))
    F = 5 * block(qtype)
    layers = {0: random_experts(rng, E, D, F), 3: random_experts(rng, E, D, F, form="gate_up+down")}
    path = write_experts_file(tmp_path_factory.mktemp("numa") / f"{qtype.name}.gguf", layers, qtype)
    return qtype, path, F


def rel_err(out, ref):
    return float(np.linalg.norm(np.asarray(out, dtype=np.float64) - ref) / np.linalg.norm(ref))


def assert_parts_match(got, want, reference, x, ids, w, exact, what):
    """The parts' sum ``got`` against one engine's ``want``: the same dot products summed in
    another order where every part's rows are whole blocks of down (``exact``; rounded once more
    to 16 bits for 16-bit x); else some part pads a down block with zeros, so its activations are
    quantized with a scale of their own, and the sum must be as close to the f64 reference
    (dequantized weights) as one engine is."""
    if exact:
        tol = (1e-5 if x.dtype == torch.float32 else 1e-2) * np.abs(want).max()
        assert np.abs(got - want).max() <= tol, what
    else:
        ref = reference.forward(x.float().numpy(), ids.numpy(), w.numpy())
        assert rel_err(got, ref) <= 1.1 * rel_err(want, ref), what


def whole_blocks(qtype, sizes):
    """Whether parts of these intermediate sizes, in order, start and end on down's blocks."""
    return all(end % block(qtype) == 0 for end in np.cumsum(sizes))


@pytest.mark.parametrize("n_nodes", [1, 2, 3, 4])
def test_nodes_give_the_single_engine_result(odd_file, n_nodes):
    qtype, path, F = odd_file
    rng = np.random.default_rng(n_nodes)
    single = lvgg.CpuMoE(lvgg.ExpertStore(path), threads=1)
    # parts are repacked from a plain store; one node runs on the store as opened: repacked too
    split = lvgg.CpuMoE(lvgg.ExpertStore(path, repack=n_nodes == 1), nodes=unbound(n_nodes))
    sizes = [split.node_intermediate_size(i, 0) for i in range(n_nodes)]
    assert sum(sizes) == F and max(sizes) - min(sizes) <= 32  # units of 32 rows, as even as they go
    for layer in (0, 3):
        reference = read_reference(path, layer)
        for T, dtype in ((1, torch.float32), (7, torch.bfloat16), (64, torch.float32)):
            x, ids, w = routing(rng, T)
            x = x.to(dtype)
            want = single(layer, x, ids, w).float().numpy()
            got = torch.full_like(x, float("nan"))
            split(layer, x, ids, w, got)
            assert_parts_match(got.float().numpy(), want, reference, x, ids, w, whole_blocks(qtype, sizes),
                               (qtype.name, n_nodes, layer, T, dtype))


def test_rows_parts_hold_vllms_share_and_blocks_parts_whole_blocks(tmp_path):
    """30B-A3B's experts (F=768, 3 blocks of 256) over two tensor-parallel ranks. By rows: 384 rows
    each, as vLLM's own ranks hold, each with the two blocks of down around its rows. By blocks:
    512 and 256 rows, the fewest bytes in all, exactly one engine's result."""
    rng = np.random.default_rng(11)
    path = write_experts_file(tmp_path / "q4k.gguf", {0: random_experts(rng, E, D, 768)}, Q.Q4_K)
    whole = lvgg.ExpertStore(path, repack=False)
    assert whole.max_parts() == 24 and whole.max_parts("blocks") == 3
    assert [whole.part_rows(0, r, 2) for r in (0, 1)] == [(0, 384), (384, 768)]
    assert [whole.part_shape(0, r, 2)[1] for r in (0, 1)] == [(0, 512), (256, 768)]
    infos = [whole.part(r, 2).layer_info(0) for r in (0, 1)]
    assert [(i.intermediate_size, i.down_columns, i.down_lead) for i in infos] == [(384, 512, 0), (384, 512, 128)]
    assert whole.part_bytes(0, 2) == whole.part_bytes(1, 2)  # the same bytes: the same time on equal cores
    x, ids, w = routing(rng, 5)
    reference = read_reference(path, 0)
    want = lvgg.CpuMoE(whole, threads=1)(0, x, ids, w).numpy()
    got = sum(lvgg.CpuMoE(whole.part(r, 2), threads=1)(0, x, ids, w).numpy() for r in (0, 1))
    assert_parts_match(got, want, reference, x, ids, w, False, "two ranks")
    assert [whole.part_rows(0, r, 2, "blocks") for r in (0, 1)] == [(0, 512), (512, 768)]
    blocks = [whole.part(r, 2, by="blocks") for r in (0, 1)]
    assert [b.layer_info(0).down_columns for b in blocks] == [512, 256]
    assert [whole.part_bytes(r, 2, "blocks") for r in (0, 1)] == [b.expert_bytes for b in blocks]
    assert sum(b.expert_bytes for b in blocks) == whole.expert_bytes < 2 * whole.part_bytes(0, 2)
    got = sum(lvgg.CpuMoE(b, threads=1)(0, x, ids, w).numpy() for b in blocks)
    assert_parts_match(got, want, reference, x, ids, w, True, "two ranks by blocks")


@pytest.mark.parametrize("n_parts", [2, 3, 8])
def test_expert_parallel_parts_hold_whole_experts_and_sum_to_the_layer(odd_file, n_parts):
    """Parts by experts (an expert-parallel rank's): each holds whole experts, takes the router's
    indices and leaves out the experts it does not hold; the parts' outputs add up to the layer's."""
    qtype, path, F = odd_file
    rng = np.random.default_rng(20 + n_parts)
    whole = lvgg.ExpertStore(path, repack=False)
    parts = [whole.part(i, n_parts, by="experts") for i in range(n_parts)]
    ranges = [whole.expert_range(0, i, n_parts) for i in range(n_parts)]
    assert ranges == {2: [(0, 4), (4, 8)], 3: [(0, 3), (3, 6), (6, 8)], 8: [(e, e + 1) for e in range(8)]}[n_parts]
    for part, (begin, end) in zip(parts, ranges):
        info = part.layer_info(3)
        assert (info.first_expert, info.n_experts, info.routed_experts, info.intermediate_size) == \
            (begin, end - begin, E, F)
    assert sum(p.expert_bytes for p in parts) == whole.expert_bytes
    # ggml's MUL_MAT_ID on the routed pairs only (repacked or not), and the per-expert schedule,
    # each against one engine on the whole layer with the same kernels
    plain = [whole.part(i, n_parts, repack=False, by="experts") for i in range(n_parts)]
    # (ggml repacks no part of a single expert here: the reference runs the layout the parts have)
    same_layout = lvgg.ExpertStore(path, repack=any(parts[0].layer_info(0).repacked.values()))
    ways = {"mul_mat_id": (lvgg.CpuMoE(same_layout, threads=1, schedule="mul_mat_id"),
                           [lvgg.CpuMoE(p, threads=1, schedule="mul_mat_id") for p in parts]),
            "per_expert": (lvgg.CpuMoE(whole, threads=1, schedule="per_expert"),
                           [lvgg.CpuMoE(p, threads=1, schedule="per_expert") for p in plain])}
    K = 4  # more than a part of 3 holds: it leaves out the slots routed elsewhere
    for layer in (0, 3):
        for T, dtype in ((1, torch.float32), (7, torch.bfloat16), (64, torch.float32)):
            x, ids, w = routing(rng, T, K)
            x = x.to(dtype)
            for way, (single, engines) in ways.items():
                want = single(layer, x, ids, w).float().numpy()
                tol = (1e-5 if dtype == torch.float32 else 1e-2) * np.abs(want).max()
                got = sum(engine(layer, x, ids, w).float().numpy() for engine in engines)
                assert np.abs(got - want).max() <= tol, (qtype.name, n_parts, layer, T, way)
    # a token routed to the first part's experts only: the others add exactly nothing
    x, _, w = routing(rng, 1, K)
    ids = torch.tensor([[e if e < ranges[0][1] else -1 for e in range(K)]], dtype=torch.int32)
    for _, engines in ways.values():
        assert all(not engine(3, x, ids, w).numpy().any() for engine in engines[1:])


def test_a_plain_part_splits_again_over_nodes(odd_file):
    """A tensor-parallel rank alone on a machine of several NUMA nodes splits its part over them."""
    qtype, path, F = odd_file
    rng = np.random.default_rng(30)
    whole = lvgg.ExpertStore(path, repack=False)
    repacked = whole.part(0, 2)  # the nodes' parts are repacked like it: the same kernels
    split = lvgg.CpuMoE(whole.part(0, 2, repack=False), nodes=unbound(2))
    x, ids, w = routing(rng, 9)
    want = lvgg.CpuMoE(repacked, threads=1)(3, x, ids, w).numpy()
    got = split(3, x, ids, w).numpy()
    exact = whole_blocks(qtype, [split.node_intermediate_size(i, 3) for i in range(2)])
    if not exact:  # the other rank's share completes the layer, to compare with the f64 reference
        got = got + lvgg.CpuMoE(whole.part(1, 2), threads=1)(3, x, ids, w).numpy()
        want = lvgg.CpuMoE(whole, threads=1)(3, x, ids, w).numpy()
    assert_parts_match(got, want, read_reference(path, 3), x, ids, w, exact, qtype.name)
    if any(repacked.layer_info(3).repacked.values()):  # types with an interleaved layout: only that copy stays
        with pytest.raises(ValueError, match="keeps only repacked copies of its experts, which cannot be split"):
            lvgg.CpuMoE(repacked, nodes=unbound(2))


def test_pinned_nodes_and_their_thread_pools(tmp_path):
    rng = np.random.default_rng(7)
    path = write_experts_file(tmp_path / "q4k.gguf", {0: random_experts(rng, E, D, 512)}, Q.Q4_K)
    cpus = sorted(os.sched_getaffinity(0))
    halves = [cpus[: len(cpus) // 2] or cpus[:1], cpus[len(cpus) // 2:]]
    moe = lvgg.CpuMoE(lvgg.ExpertStore(path, repack=False), nodes=[lvgg.EngineNode(h) for h in halves])
    assert moe.threads == len(cpus) and sorted(moe.cpus) == cpus
    x, ids, w = routing(rng, 33)
    single = lvgg.CpuMoE(lvgg.ExpertStore(path), threads=1)
    np.testing.assert_allclose(moe(0, x, ids, w).numpy(), single(0, x, ids, w).numpy(), rtol=0, atol=1e-5)


def test_parts_live_in_their_nodes_memory(tmp_path):
    """Every page of every node's part is on the NUMA node it names (move_pages)."""
    machine = read_machine()
    with_memory = [n.id for n in machine.nodes if n.mem_total != 0] or [0]
    rng = np.random.default_rng(8)
    path = write_experts_file(tmp_path / "q8.gguf", {0: random_experts(rng, E, D, 1024)}, Q.Q8_0)
    homes = [with_memory[i % len(with_memory)] for i in range(2)]
    moe = lvgg.CpuMoE(lvgg.ExpertStore(path, repack=False),
                      nodes=[lvgg.EngineNode((), threads=1, mem_node=m) for m in homes])
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    for i, home in enumerate(homes):
        pages = [a for address, size in moe._engine.part_memory(i)
                 for a in range(-(-address // page) * page, address + size - page, page)]
        assert pages
        addrs = (ctypes.c_void_p * len(pages))(*pages)
        status = (ctypes.c_int * len(pages))()
        rc = libc.syscall(279, 0, ctypes.c_ulong(len(pages)), addrs, None, status, 0)  # move_pages: query only
        assert rc == 0, os.strerror(ctypes.get_errno())
        assert set(status) == {home}, f"node {i}: pages on nodes {sorted(set(status))}, expected {home}"


def test_bad_node_configurations_are_refused(tmp_path):
    rng = np.random.default_rng(9)
    path = write_experts_file(tmp_path / "q6k.gguf", {0: random_experts(rng, E, D, 768)}, Q.Q6_K)
    store = lvgg.ExpertStore(path, repack=False)
    cpu = sorted(os.sched_getaffinity(0))[0]
    with pytest.raises(ValueError, match=f"CPU {cpu} is in node 0 and node 1; nodes must not share CPUs"):
        lvgg.CpuMoE(store, nodes=[lvgg.EngineNode([cpu]), lvgg.EngineNode([cpu])])
    with pytest.raises(ValueError, match="threads=2 but only 1 CPUs are given"):
        lvgg.CpuMoE(store, nodes=[lvgg.EngineNode([cpu], threads=2), lvgg.EngineNode((), threads=1)])
    with pytest.raises(ValueError, match="NUMA node 4096 does not exist"):
        lvgg.CpuMoE(store, nodes=[lvgg.EngineNode((), threads=1, mem_node=4096), lvgg.EngineNode((), threads=1)])
    with pytest.raises(ValueError, match=r"intermediate size 768 is 24 units of 32 rows, too few to split over 25 "
                                         r"nodes or ranks; use at most 24"):
        lvgg.CpuMoE(store, nodes=unbound(25))
    with pytest.raises(ValueError, match="not threads=/cpus="):
        lvgg.CpuMoE(store, threads=2, nodes=unbound(2))
    with pytest.raises(ValueError, match="neither CPUs nor a thread count"):
        lvgg.CpuMoE(store, nodes=[lvgg.EngineNode(()), lvgg.EngineNode((), threads=1)])


def test_more_nodes_than_parts_share_parts(tmp_path):
    # F=96 is 3 units of 32 rows: on a 4-node machine the plugin groups nodes rather than fail.
    from lvgg import topology
    from lvgg.plan import Host, engine_nodes
    from lvgg.vllm_plugin.settings import CpuSettings

    rng = np.random.default_rng(10)
    path = write_experts_file(tmp_path / "q8.gguf", {0: random_experts(rng, E, D, 96)}, Q.Q8_0)
    assert lvgg.ExpertStore(path).max_parts() == 3
    four = topology.Topology("auto", tuple(range(8)), tuple(
        topology.Node(i, ((2 * i,), (2 * i + 1,)), i) for i in range(4)), read_machine())
    nodes, note = engine_nodes(Host(four), 3, CpuSettings())
    assert [list(n.cpus) for n in nodes] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    assert [n.mem_node for n in nodes] == [0, 2, 3] and "4 NUMA nodes share them in 3 groups" in note
    assert len(engine_nodes(Host(four), 4, CpuSettings())[0]) == 4 and engine_nodes(Host(four), 1, CpuSettings()) == (None, None)
    assert [list(n.cpus) for n in engine_nodes(Host(four), 3, CpuSettings(threads=(2, 1, 1)))[0]] == [[0, 1], [4], [6]]


def test_tensor_parallel_ranks_take_whole_nodes_nearest_their_gpus():
    from lvgg import topology
    from lvgg.plan import Gpu, Host, rank_cpus

    def gpus_on(*nodes):  # next to a GPU a rank keeps its first core for vLLM's thread
        return tuple(Gpu(i, 80 << 30, node) for i, node in enumerate(nodes))

    def machine_of(n_nodes: int, cores_per_node: int, process_cpus=None) -> topology.Topology:
        cpus = range(n_nodes * cores_per_node)
        machine = topology.Machine(
            tuple(topology.MachineNode(i, tuple(cpus[i * cores_per_node:(i + 1) * cores_per_node]), 1 << 30, 1 << 30)
                  for i in range(n_nodes)),
            tuple(tuple(10 if i == j else 20 for j in range(n_nodes)) for i in range(n_nodes)),
            {c: (c,) for c in cpus})
        return topology.resolve(topology.parse_numa("auto"), machine, process_cpus or cpus)

    two = Host(machine_of(2, 4))
    assert [rank_cpus(two, r, 2) for r in (0, 1)] == [([0, 1, 2, 3], 0), ([4, 5, 6, 7], 1)]
    two_gpus = Host(two.topology, gpus=gpus_on(1, 0))
    assert [rank_cpus(two_gpus, r, 2) for r in (0, 1)] == [([5, 6, 7], 1), ([1, 2, 3], 0)]
    # both GPUs on node 0, or a GPU of unknown node: the nodes go in rank order, one each
    for gpu_nodes in ((0, 0), (1, None)):
        assert [rank_cpus(Host(two.topology, gpus=gpus_on(*gpu_nodes)), r, 2)[1] for r in (0, 1)] == [0, 1], gpu_nodes
    four = Host(machine_of(4, 2), gpus=gpus_on(3, 0))
    assert [rank_cpus(four, r, 2) for r in (0, 1)] == [([5, 6, 7], 2), ([1, 2, 3], 0)]
    one = Host(machine_of(1, 8))  # fewer nodes than ranks: the cores in order, memory where they touch it
    assert [rank_cpus(one, r, 2) for r in (0, 1)] == [([0, 1, 2, 3], None), ([4, 5, 6, 7], None)]
    assert rank_cpus(one, 1, 3) == ([3, 4, 5], None)
    # in proportion to the ranks' expert bytes
    assert [rank_cpus(one, r, 2, weights=[512, 256])[0] for r in (0, 1)] == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert [rank_cpus(one, r, 3, weights=[1, 1, 100])[0] for r in (0, 1, 2)] == [[0], [1], [2, 3, 4, 5, 6, 7]]
    bound = Host(machine_of(2, 4, process_cpus=[4, 5]))  # vLLM bound this rank already: its CPUs, whatever the rank
    assert rank_cpus(bound, 0, 2) == ([4, 5], None)


def test_a_part_knows_its_bytes_before_it_is_made(odd_file):
    _, path, _ = odd_file
    store = lvgg.ExpertStore(path, repack=False)
    for by in ("rows", "blocks", "experts"):
        sizes = [store.part_bytes(r, 3, by) for r in range(3)]
        assert sizes == [store.part(r, 3, repack=False, by=by).expert_bytes for r in range(3)], by


def test_a_thread_bound_for_a_block_gets_its_cpus_back():
    from lvgg import topology

    before = os.sched_getaffinity(0)
    first = min(before)
    with topology.bound_to([first]):
        assert os.sched_getaffinity(0) == {first}
        assert lvgg._bridge.process_cpus() == [first]  # what a part's packing threads run on
    assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("strict", [False, True])
def test_an_engine_on_given_cpus_leaves_its_makers_cpus_alone(tmp_path, strict):
    # ggml's own pool (builds next to an NVIDIA driver) binds the thread that makes it to its first
    # worker's CPUs; that thread is vLLM's, which must keep its CPUs.
    path = write_experts_file(tmp_path / "e.gguf", {0: random_experts(np.random.default_rng(3), 8, 64, 64)}, Q.Q8_0)
    before = os.sched_getaffinity(0)
    moe = lvgg.CpuMoE(lvgg.ExpertStore(path), threads=1, cpus=[max(before)], strict_cpu=strict)
    assert os.sched_getaffinity(0) == before
    del moe
