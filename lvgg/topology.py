"""CPU and NUMA topology as lvgg uses it: what /sys says, restricted to this process's CPUs.

    topo = lvgg.topology.current()          # reads /sys, LVGG_NUMA and os.sched_getaffinity
    for node in topo.nodes:
        cpus = node_thread_cpus(node, reserve=1)   # one engine thread per CPU returned

``LVGG_NUMA`` chooses the nodes:

- ``auto`` (default): one node per NUMA node of the machine that has CPUs of this process.
- ``off``: a single node of every CPU of this process; memory is not bound to a node.
- ``nodes=SPEC``: virtual nodes, e.g. to exercise multi-node code on a one-node machine.
  SPEC is one or more nodes separated by ``;``; a node is a cpulist in the kernel's form
  (``0-3,8-11``: numbers and ranges separated by ``,``), optionally followed by ``@N``, the
  NUMA node whose memory it uses. Without ``@N`` a node uses the memory of the NUMA node its
  CPUs belong to; a node whose CPUs span several NUMA nodes needs ``@N``. Examples:
  ``nodes=0-3,8-11;4-7,12-15`` (two nodes), ``nodes=0;1`` (two one-CPU nodes),
  ``nodes=0-7@0;8-15@0`` (both using node 0's memory). ``nodes=0-7,8-15`` is ONE node.

Every reader takes the /sys root as a parameter (default ``/sys``) so tests can point it at
a tree of their own.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

NUMA_ENV = "LVGG_NUMA"
MAX_CPU = 8191  # the kernel's largest NR_CPUS is 8192


@dataclass(frozen=True)
class MachineNode:
    """A NUMA node as the kernel reports it (all its CPUs, whatever this process may use)."""

    id: int
    cpus: tuple[int, ...]
    mem_total: int | None  # bytes; None when the kernel does not say
    mem_free: int | None


@dataclass(frozen=True)
class Machine:
    """What /sys says: NUMA nodes, node distances and the SMT siblings of every online CPU."""

    nodes: tuple[MachineNode, ...]
    distances: tuple[tuple[int, ...], ...]  # distances[i][j]: from nodes[i] to nodes[j]
    siblings: Mapping[int, tuple[int, ...]]  # CPU -> the CPUs of its physical core (itself included)

    def node(self, node_id: int) -> MachineNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ValueError(f"NUMA node {node_id} does not exist; this machine has nodes "
                         f"{', '.join(str(n.id) for n in self.nodes)}")

    def node_of_cpu(self, cpu: int) -> int | None:
        return next((n.id for n in self.nodes if cpu in n.cpus), None)

    def memory_home(self, node_id: int) -> int:
        """``node_id`` if it has memory (or the kernel does not say), else the nearest node that has."""
        i = self.nodes.index(self.node(node_id))
        with_memory = [j for j, n in enumerate(self.nodes) if n.mem_total != 0]
        if not with_memory:
            raise ValueError("no NUMA node reports any memory (MemTotal 0 in every nodeN/meminfo)")
        return self.nodes[min(with_memory, key=lambda j: (self.distances[i][j], j))].id


@dataclass(frozen=True)
class Node:
    """A node lvgg runs one engine on: usable CPUs grouped by physical core, and its memory."""

    id: int
    cores: tuple[tuple[int, ...], ...]  # usable CPUs of each physical core (SMT siblings together), by first CPU
    mem_node: int | None  # the NUMA node whose memory it uses; None: not bound (LVGG_NUMA=off)

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(sorted(c for core in self.cores for c in core))

    @property
    def physical_cores(self) -> tuple[int, ...]:
        """The first usable CPU of every physical core."""
        return tuple(core[0] for core in self.cores)


@dataclass(frozen=True)
class Topology:
    """The nodes lvgg uses under a LVGG_NUMA setting, and the machine they come from."""

    setting: str
    process_cpus: tuple[int, ...]
    nodes: tuple[Node, ...]
    machine: Machine


# --- cpulists -----------------------------------------------------------------------------

def parse_cpulist(text: str, what: str = "cpulist") -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> (0, 1, 2, 3, 8, 10, 11). Empty text is an empty list; a CPU listed
    twice, a reversed range or anything but numbers, ``-`` and ``,`` is a ValueError."""
    return parse_ranges(text, what, item="CPU", largest=MAX_CPU)


def parse_ranges(text: str, what: str, *, item: str, largest: int) -> tuple[int, ...]:
    """Numbers written as a Linux cpulist (``"0-5,40"``), sorted; ``item`` names them in errors."""
    values: list[int] = []
    text = text.strip()
    for part in text.split(",") if text else []:
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{what}: {part.strip()!r} is not a {item} number or range; expected a list "
                             f"such as 0-3,8-11, found {text!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"{what}: range {part.strip()!r} is empty or negative; write ranges low-high, "
                             f"e.g. 0-3")
        if last > largest:
            raise ValueError(f"{what}: {item} {last} is beyond the largest there is ({largest})")
        values.extend(range(first, last + 1))
    seen: set[int] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{what}: {item} {v} is listed twice in {text!r}; list each {item} once")
        seen.add(v)
    return tuple(sorted(values))


def format_cpulist(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 3, 8) -> ``"0-3,8"``."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


# --- /sys ---------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _kb_fields(path: Path) -> dict[str, int]:
    """The ``Name: N kB`` fields of a meminfo file in bytes (a node's lines start ``Node K``)."""
    values: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        fields = line.split()
        if fields[:1] == ["Node"]:
            fields = fields[2:]
        if len(fields) == 3 and fields[2] == "kB":
            values[fields[0].rstrip(":")] = int(fields[1]) * 1024
    return values


def meminfo(proc_root: Path = Path("/proc")) -> dict[str, int | None]:
    """MemTotal, MemFree and MemAvailable of the machine in bytes (None where unknown)."""
    values = _kb_fields(proc_root / "meminfo")
    return {"total": values.get("MemTotal"), "free": values.get("MemFree"), "available": values.get("MemAvailable")}


def _node_meminfo(path: Path) -> tuple[int | None, int | None]:
    """MemTotal and MemFree in bytes from a node's meminfo (``Node 0 MemTotal:  24684084 kB``)."""
    values = _kb_fields(path)
    return values.get("MemTotal"), values.get("MemFree")


def read_machine(sys_root: str | os.PathLike[str] = "/sys") -> Machine:
    """The NUMA nodes, distances and SMT siblings under ``sys_root``. A kernel without NUMA
    support (no devices/system/node) is one node 0 holding every online CPU."""
    root = Path(sys_root)
    cpu_dir, node_dir = root / "devices/system/cpu", root / "devices/system/node"
    online = _read(cpu_dir / "online")
    if online is None:
        raise ValueError(f"{cpu_dir / 'online'} is missing; expected the kernel's list of online CPUs "
                         f"(is {root} a sysfs?)")
    online_cpus = parse_cpulist(online, str(cpu_dir / "online"))

    siblings: dict[int, tuple[int, ...]] = {}
    for c in online_cpus:
        text = _read(cpu_dir / f"cpu{c}/topology/thread_siblings_list")
        siblings[c] = parse_cpulist(text, f"cpu{c} thread_siblings_list") if text else (c,)

    node_list = _read(node_dir / "online")
    if node_list is None:
        return Machine((MachineNode(0, online_cpus, None, None),), ((10,),), siblings)
    nodes: list[MachineNode] = []
    rows: list[tuple[int, ...]] = []
    ids = parse_cpulist(node_list, str(node_dir / "online"))
    for i in ids:
        d = node_dir / f"node{i}"
        cpus = parse_cpulist(_read(d / "cpulist") or "", str(d / "cpulist"))
        nodes.append(MachineNode(i, tuple(c for c in cpus if c in siblings), *_node_meminfo(d / "meminfo")))
        try:
            row = tuple(int(v) for v in (_read(d / "distance") or "").split())
        except ValueError:
            row = ()
        if len(row) != len(ids):
            raise ValueError(f"{d / 'distance'}: expected {len(ids)} distances (one per online node), found "
                             f"{_read(d / 'distance')!r}")
        rows.append(row)
    return Machine(tuple(nodes), tuple(rows), siblings)


# --- LVGG_NUMA ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NumaSetting:
    mode: str  # "auto", "off" or "nodes"
    nodes: tuple[tuple[tuple[int, ...], int | None], ...] = ()  # mode "nodes": (cpus, memory node or None)
    text: str = "auto"


def parse_numa(value: str | None) -> NumaSetting:
    """Parse a LVGG_NUMA value (see the module's docstring); None or empty is ``auto``."""
    text = (value or "").strip()
    if text in ("", "auto"):
        return NumaSetting("auto")
    if text == "off":
        return NumaSetting("off", text="off")
    if not text.startswith("nodes="):
        raise ValueError(f"{NUMA_ENV}={text!r}: expected auto, off or nodes=CPULIST;CPULIST;... "
                         f"(e.g. nodes=0-3,8-11;4-7,12-15)")
    nodes: list[tuple[tuple[int, ...], int | None]] = []
    for i, entry in enumerate(text[len("nodes="):].split(";")):
        cpulist, at, mem = entry.partition("@")
        what = f"{NUMA_ENV} node {i} ({entry.strip()!r})"
        cpus = parse_cpulist(cpulist, what)
        if not cpus:
            raise ValueError(f"{what} has no CPUs; give each node a cpulist and separate nodes with "
                             f"';' (no empty entries)")
        mem_node = None
        if at:
            try:
                mem_node = int(mem)
            except ValueError:
                raise ValueError(f"{what}: expected a NUMA node number after '@', found {mem.strip()!r}") from None
        nodes.append((cpus, mem_node))
    return NumaSetting("nodes", tuple(nodes), text)


def _group_by_core(cpus: Iterable[int], siblings: Mapping[int, tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
    chosen = set(cpus)
    cores = {tuple(sorted({cpu, *siblings.get(cpu, ())} & chosen)) for cpu in chosen}
    return tuple(sorted(cores))


def resolve(setting: NumaSetting, machine: Machine, process_cpus: Iterable[int]) -> Topology:
    """The nodes lvgg uses: ``setting`` applied to ``machine`` within ``process_cpus``."""
    allowed = tuple(sorted(set(process_cpus)))
    usable = set(allowed) & set(machine.siblings)
    if not usable:
        raise ValueError(f"none of this process's CPUs ({format_cpulist(allowed)}) is online in /sys; "
                         f"online: {format_cpulist(machine.siblings)}")
    nodes: list[Node] = []
    if setting.mode == "off":
        nodes.append(Node(0, _group_by_core(usable, machine.siblings), None))
    elif setting.mode == "auto":
        for mn in machine.nodes:
            cpus = usable.intersection(mn.cpus)
            if cpus:  # nodes of memory only, or outside this process's CPUs, run no engine
                nodes.append(Node(mn.id, _group_by_core(cpus, machine.siblings), machine.memory_home(mn.id)))
        if not nodes:
            raise ValueError(f"no NUMA node lists any of this process's CPUs ({format_cpulist(allowed)}); "
                             f"set {NUMA_ENV}=off")
    else:
        owner: dict[int, int] = {}
        for i, (cpus, mem_node) in enumerate(setting.nodes):
            outside = [c for c in cpus if c not in usable]
            if outside:
                raise ValueError(f"{NUMA_ENV} node {i}: CPU {format_cpulist(outside)} outside this process's CPU "
                                 f"set ({format_cpulist(allowed)}); use only those (see taskset -p / numactl --show)")
            for c in cpus:
                if c in owner:
                    raise ValueError(f"{NUMA_ENV}: CPU {c} is in node {owner[c]} and node {i}; nodes must not "
                                     f"overlap")
                owner[c] = i
            if mem_node is None:
                homes = sorted({machine.node_of_cpu(c) for c in cpus} - {None})
                if len(homes) != 1:
                    found = f"span NUMA nodes {', '.join(map(str, homes))}" if homes else "are in no NUMA node's cpulist"
                    raise ValueError(f"{NUMA_ENV} node {i}: CPUs {format_cpulist(cpus)} {found}; say whose memory "
                                     f"it uses with @N, e.g. {format_cpulist(cpus)}@{machine.nodes[0].id}")
                mem_node = machine.memory_home(homes[0])
            elif machine.node(mem_node).mem_total == 0:
                raise ValueError(f"{NUMA_ENV} node {i}: @{mem_node} names a NUMA node without memory; "
                                 f"name one of {', '.join(str(n.id) for n in machine.nodes if n.mem_total != 0)}")
            nodes.append(Node(i, _group_by_core(cpus, machine.siblings), mem_node))
    return Topology(setting.text, allowed, tuple(nodes), machine)


def current(sys_root: str | os.PathLike[str] = "/sys", numa: str | None = None) -> Topology:
    """This process's topology: /sys under ``sys_root``, ``numa`` (default: $LVGG_NUMA) and
    os.sched_getaffinity(0)."""
    setting = parse_numa(os.environ.get(NUMA_ENV) if numa is None else numa)
    return resolve(setting, read_machine(sys_root), os.sched_getaffinity(0))


# --- threads ------------------------------------------------------------------------------

@contextlib.contextmanager
def bound_to(cpus: Iterable[int]):
    """Run the calling thread on ``cpus`` for the block (memory it first touches then lands on
    their node), then on the CPUs it had."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def split_cpus(cpus: Sequence[int], weights: Sequence[float]) -> list[list[int]]:
    """``cpus`` cut in order into one run per weight, sized in proportion to it, each of at least
    one CPU; equal weights: runs as even as they go, the first ones one longer."""
    if len(set(weights)) == 1 or min(weights) <= 0:
        return [[int(c) for c in run] for run in np.array_split(list(cpus), len(weights))]
    k, n = len(weights), len(cpus)
    if k > n:
        raise ValueError(f"{n} CPUs cannot make {k} runs of at least one each")
    total, ends, acc = float(sum(weights)), [], 0.0
    for i, w in enumerate(weights):
        acc += w
        lowest, highest = (ends[-1] if ends else 0) + 1, n - (k - 1 - i)
        ends.append(min(max(int(n * acc / total + 0.5), lowest), highest))
    return [list(cpus[a:b]) for a, b in zip([0, *ends[:-1]], ends)]


def node_thread_cpus(node: Node, *, reserve: int = 0, threads: int | None = None) -> tuple[int, ...]:
    """The CPUs to run a node's engine threads on, one thread per CPU returned.

    Default: the node's physical cores minus ``reserve`` (its first cores are left free, e.g.
    for the process driving a GPU), at least one. ``threads`` overrides the count: the reserved
    cores come after the others, then the SMT siblings, up to every CPU of the node.
    """
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0 cores, found {reserve}")
    cores = node.physical_cores
    order = cores[reserve:] + cores[:reserve] + tuple(c for core in node.cores for c in core[1:])
    if threads is None:
        return order[:max(1, len(cores) - reserve)]
    if not 1 <= threads <= len(order):
        smt = len(order) - len(cores)
        raise ValueError(f"node {node.id}: threads={threads}, expected 1 to {len(order)} (its {len(cores)} "
                         f"physical cores" + (f" and {smt} SMT siblings" if smt else "") + "); more threads "
                         "than CPUs leave ggml's spinning barrier waiting on descheduled threads")
    return order[:threads]
