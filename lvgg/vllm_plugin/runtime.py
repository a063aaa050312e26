"""This process's experts, as vLLM's MoE layers share them: the plan of its rank (lvgg.plan),
executed once, then the CPU engine, the CUDA bridge to it and the GPU's experts.

Made at the first MoE layer vLLM builds, after checking that the experts file matches the
model (architecture, MoE layers, expert count, sizes); a mismatch stops startup with a
message naming the first difference. Every layer then reaches them through ``process``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any

import torch

from lvgg import _bridge, topology
from lvgg.gpu.bridge import CudaExperts
from lvgg.experts import CpuMoE, EngineNode, ExpertStore
from lvgg.gpu.experts import GpuExperts, layer_infos, link_bytes, reads_packed
from lvgg.gpu.split import MOST_TOKENS, SplitExperts, best_slots, calibrate
from lvgg.doctor import human_size
from lvgg.models import check_experts_match, model_spec
from lvgg.plan import SPLIT_EXPERTS, ExpertFiles, Host, Parallel, RankPlan, describe_rank, plan_gpu_layers, plan_rank
from lvgg.vllm_plugin import EXPERTS_ENV, GPU_SPLIT_ENV, settings
from lvgg.vllm_plugin.metrics import Metrics, process_metrics
from lvgg.vllm_plugin.settings import CpuSettings, GpuSettings

log = logging.getLogger("vllm.lvgg")  # vLLM's handlers and level


def check_experts_file(store: ExpertStore, hf_config: dict[str, Any], layers: list[int] | None = None) -> None:
    """Raise ValueError naming the first difference between the experts file and the model
    (its MoE ``layers`` only, e.g. a pipeline-parallel rank's, whose store holds those only)."""
    dims = {}
    for layer in store.layers:
        info = store.layer_info(layer)
        dims[layer] = (info.routed_experts, info.hidden_size, info.intermediate_size, info.biased)
    check_experts_match(store.path, store.metadata(), dims, hf_config, layers)


# seconds between two progress lines of a long start (placing the experts)
PROGRESS_PERIOD = 5.0


@contextlib.contextmanager
def progress(what: str, period: float = PROGRESS_PERIOD):
    """Log the progress of the block (the experts' bytes placed by this process's stores: mapped and
    checked, copied into parts, repacked), with the time left at the rate so far, every ``period``
    seconds while it runs, and what it placed in how long when it is done."""
    done0, total0 = _bridge.placement_progress()
    start, stop = time.perf_counter(), threading.Event()

    def report() -> None:
        while not stop.wait(period):
            done, total = (a - b for a, b in zip(_bridge.placement_progress(), (done0, total0)))
            if total > 0 and done > 0:
                left = (time.perf_counter() - start) * (total - done) / done
                log.info("lvgg: %s: %s of %s (%d%%), about %.0f s left", what, human_size(done), human_size(total),
                         100 * done // total, left)

    reporter = threading.Thread(target=report, name="lvgg-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        stop.set()
        reporter.join()
    done = _bridge.placement_progress()[0] - done0
    log.info("lvgg: %s: %s in %.1f s", what, human_size(done), time.perf_counter() - start)


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


class Runtime:
    """The experts of this process: made on first use, then shared by every MoE layer."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # gpu_experts() makes the split, which takes cuda_experts()
        self.plan: RankPlan | None = None  # this rank's, as executed (its gpu part once the GPU's experts are made)
        self.opened_at: float | None = None  # time.perf_counter() when the experts file was opened (startup figures)
        self._engine: CpuMoE | None = None
        self._cuda: CudaExperts | None = None
        self._gpu: GpuExperts | None = None
        self._split: SplitExperts | None = None
        self._gpu_made = False
        self._gpu_min_tokens: int | None = None
        self._gpu_memory_utilization = 0.9
        # What the GPU's experts are read from: a store (the whole file, mapped; or a tensor-parallel
        # rank's part, packed, which its engine computes from), the part of it this rank computes and
        # how the ranks split (ExpertStore.part's by).
        self._gpu_source: tuple[ExpertStore, tuple[int, int], str] | None = None
        self.metrics: Metrics | None = None  # this process's series in vLLM's /metrics

    def engine(self, hf_config: dict[str, Any], max_tokens: int, gpu_memory_utilization: float = 0.9,
               tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1, expert_parallel: bool = False,
               activation: str = "silu", mtp: bool = False) -> CpuMoE:
        """The engine of this process (its experts' ``activation``: CpuMoE's), created (and the file
        checked) on first use. A tensor-parallel rank (tp_rank of tp_size) computes its share of every
        expert, an expert-parallel one (``expert_parallel``, over the same ranks) the whole experts it
        holds (vLLM's all-reduce sums the ranks' outputs either way); a pipeline-parallel rank holds
        its own layers' experts only. The model's next-token-prediction layers are held only where vLLM
        drafts with them (``mtp``)."""
        with self._lock:
            self._gpu_memory_utilization = gpu_memory_utilization
            if self._engine is None:
                self._engine = self.make_engine(hf_config, max_tokens, Parallel(tp_size, pp_size, expert_parallel, mtp),
                                                tp_rank, pp_rank, activation=activation)
            return self._engine

    def make_engine(self, hf_config: dict[str, Any], max_tokens: int, parallel: Parallel, tp_rank: int = 0,
                    pp_rank: int = 0, local: tuple[int, int] | None = None, activation: str = "silu") -> CpuMoE:
        """Plan this rank (``local``: its index and count among this machine's ranks, default vLLM's)
        and execute the plan: open and check the experts file, copy the rank's part on its own CPUs,
        start the engine."""
        spec = model_spec(hf_config)
        cpu = CpuSettings.from_env()
        files = ExpertFiles(os.environ[EXPERTS_ENV])
        self.opened_at = time.perf_counter()
        plan, notes = plan_rank(spec, files, Host.current(), cpu, GpuSettings.from_env(), parallel, tp_rank, pp_rank,
                                local or local_rank())
        for note in notes:
            log.warning("lvgg: %s", note)
        layers, several_nodes = list(plan.layers), len(plan.parts) > 1

        def open_store() -> ExpertStore:
            # A store that is split only maps the file (the parts are the copies); the planner opened it.
            store = files.store(layers) if plan.split else ExpertStore(
                files.path, repack=plan.repack, layers=layers, own_kernels=cpu.own_kernels)
            check_experts_file(store, hf_config, layers)
            log.info("lvgg: experts file %s opened and checked in %.1f s", store.path, time.perf_counter() - self.opened_at)
            return store

        # A rank's copies are made by its own cores (first touch): they land in their node's memory.
        placing = "repacking the experts" if plan.repack else "reading the experts"
        with topology.bound_to(plan.copy_cpus) if plan.copy_cpus else contextlib.nullcontext(), progress(placing):
            store = open_store()
            # The GPU reads the rank's part, as its CPU engine holds it: from the file's mapping, or from
            # the engine's own copy where that is in lvgg's packed layout (then the whole file is unmapped
            # when its store goes, as without a GPU).
            self._gpu_source = (store, (tp_rank, parallel.tp_size), plan.by) if torch.cuda.is_available() else None
            if parallel.tp_size > 1:
                # A rank alone on several nodes splits its part again, over them: a plain copy, split, then repacked.
                store = store.part(tp_rank, parallel.tp_size, repack=plan.repack and not several_nodes, by=plan.by)
                if self._gpu_source and all(map(reads_packed, layer_infos(store).values())):
                    self._gpu_source = (store, (0, 1), plan.by)
        kwargs = dict(max_tokens=max(max_tokens, 8192), max_top_k=spec.top_k, activation=activation,
                      strict_cpu=cpu.strict_binding)
        if several_nodes:
            with progress("copying the experts to their NUMA nodes"):
                moe = CpuMoE(store, nodes=[EngineNode(p.cpus, mem_node=p.mem_node) for p in plan.parts],
                             repack=plan.repack, **kwargs)
        else:
            part = plan.parts[0]
            moe = CpuMoE(store, threads=part.threads, cpus=part.cpus or None, **kwargs)
        self.plan = plan
        log.info("lvgg: %s", describe_rank(plan, parallel, files.path))
        self.metrics = process_metrics(moe.call_stats()["bounds"])
        if self.metrics:
            self.metrics.watch_engine(moe, files.path)
        return moe

    @property
    def cpu_engine(self) -> CpuMoE | None:
        """The engine, None before the first MoE layer made it."""
        return self._engine

    def current_engine(self) -> CpuMoE:
        if self._engine is None:
            raise RuntimeError("lvgg's CPU MoE engine is not initialized: no MoE layer was built with the plugin")
        return self._engine

    def cuda_experts(self, dtype) -> CudaExperts:
        """The engine behind CUDA tensors: pinned buffers made at the first call (outside any graph
        capture: vLLM's profiling run comes first)."""
        if self._cuda is not None:  # every layer of every step asks: no lock once made
            return self._cuda
        with self._lock:
            if self._cuda is None:
                moe = self.current_engine()
                layer = moe.store.layer_info(moe.store.layers[0])
                self._cuda = CudaExperts(moe, hidden_size=layer.hidden_size, top_k=moe.max_top_k,
                                         max_tokens=moe.max_tokens, dtype=dtype)
                log.info("lvgg: the CUDA stream hands each MoE layer to the CPU through %s",
                         "flags (stream memory operations)" if self._cuda.signal == "flags" else "host functions")
            return self._cuda

    def gpu_experts(self, device, dtype) -> GpuExperts | None:
        """The experts this process runs on the GPU (streamed for long passes, resident layers), made
        at the first call with CUDA tensors: vLLM's profiling run, so their VRAM is counted before
        the KV cache is sized. None when no layer runs on the GPU."""
        if self._gpu_made:  # every layer of every step asks: no lock once decided
            return self._gpu
        with self._lock:
            if not self._gpu_made:
                self.current_engine()  # made first
                self._gpu, self._split = self._make_gpu_experts(device, dtype)
                self._gpu_made = True
            return self._gpu

    def split_experts(self) -> SplitExperts | None:
        """The CPU/GPU split of short passes, made with gpu_experts(); None when off."""
        return self._split

    def _make_gpu_experts(self, device, dtype) -> tuple[GpuExperts | None, SplitExperts | None]:
        store, part, by = self._gpu_source
        wanted = GpuSettings.from_env()
        if wanted.decode_split == "auto" and not self.plan.repack:
            log.info("lvgg: %s=auto: no decode split, the CPU computing from the file's own layout (LVGG_REPACK "
                     "off): there the GPU's fetches from the file slow the CPU more than they take off it",
                     GPU_SPLIT_ENV)
            wanted = dataclasses.replace(wanted, decode_split=None)
        self._gpu_min_tokens = wanted.prefill_min_tokens
        free, total = torch.cuda.mem_get_info(device)
        usable = max(0.0, self._gpu_memory_utilization * total - (total - free))  # what vLLM may still take
        infos = layer_infos(store, part, by)
        plan = plan_gpu_layers(infos, wanted, usable, dtype, self.plan.elsewhere,
                               {layer: self._engine.activation_of(layer) for layer in infos})
        self.plan = dataclasses.replace(self.plan, gpu=plan)
        for note in plan.notes:
            log.warning("lvgg: %s", note)
        if not plan.streamed and not plan.resident and not plan.split:
            return None, None
        log.info("lvgg: making the GPU's experts (pinning the host memory they are read from, copying %d resident "
                 "layers)", len(plan.resident))
        t0 = time.perf_counter()
        with progress("reading in the experts the GPU reads, to pin them"):
            gpu = GpuExperts(store, device=device, dtype=dtype, streamed_layers=plan.streamed,
                             resident_layers=plan.resident, split_layers=plan.split, split_experts=SPLIT_EXPERTS,
                             stream_group=plan.stream_group, part=part, by=by)
        log.info("lvgg: experts on %s%s in %.1f s: %d layers streamed for passes of >= %s tokens, %d resident, %d "
                 "split with the CPU in decode steps; %.2f GiB of VRAM; read from %s", device,
                 f" (part {part[0] + 1} of {part[1]} by {by})" if part[1] > 1 else "", time.perf_counter() - t0,
                 len(plan.streamed),
                 wanted.prefill_min_tokens, len(plan.resident), len(gpu.split_layers), gpu.vram_bytes / 2**30,
                 "the CPU engine's packed copy" if gpu.reads_packed_copy else "the experts file")
        split = make_split(gpu, self.cuda_experts(dtype), wanted.decode_split) if gpu.split_layers else None
        if self.metrics:
            self.metrics.gpu_made(len(plan.resident), split)
        return gpu, split

    def run_on_gpu(self, gpu: GpuExperts, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
        """``gpu``'s experts of ``layer`` (runs_on_gpu), timed for the metrics outside graph capture."""
        resident = layer in gpu.resident_layers
        call = self.metrics.time_gpu("gpu_resident" if resident else "gpu_streamed", x.shape[0],
                                     0 if resident else link_bytes(gpu.layer_info(layer))) if self.metrics else None
        out = gpu(layer, x, topk_ids, topk_weights)
        if call is not None:
            call.done()
        return out

    def runs_on_gpu(self, gpu: GpuExperts | None, layer: int, n_tokens: int) -> bool:
        """Whether this call goes to the GPU experts (resident layers always; streamed ones for long
        passes outside graph capture) rather than to the CPU engine."""
        if gpu is None:
            return False
        if layer in gpu.resident_layers:
            return True
        return (self._gpu_min_tokens is not None and n_tokens >= self._gpu_min_tokens
                and layer in gpu.streamed_layers and not torch.cuda.is_current_stream_capturing())


process = Runtime()  # this process's


def make_split(gpu: GpuExperts, cpu: CudaExperts, wanted: int | str) -> SplitExperts | None:
    """The decode split, sharing the CPU's bridge: the GPU's share ``wanted`` (of top_k), or for
    "auto" the share that was fastest here for each batch size (each way replayed in CUDA graphs)."""
    top_k = cpu.top_k
    if wanted == "auto":
        log.info("lvgg: %s=auto: timing the decode split (each share of a token's experts the GPU may take, per "
                 "batch size)", GPU_SPLIT_ENV)
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
    return SplitExperts(gpu, cpu, slots=slots, count_fetches=True) if any(slots.values()) else None
