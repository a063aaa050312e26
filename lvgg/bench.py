"""Benchmarks (not tests): the CPU MoE layer against the machine's read bandwidth.

Each run measures the floor it is compared with: memory read bandwidth with the same thread
count, and ggml's plain MUL_MAT_ID graph on weights used in place (no repack) next to the
engine's configurations (CONFIGS): weight layout x schedule (x lvgg's kernel set).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from lvgg import _bridge
from lvgg.experts import CpuMoE, ExpertStore
from lvgg.models import gguf_expert_name as tensor_name
from lvgg.quantize import add_quantized_tensor, quantize, write_all

# Engine configurations measured: ExpertStore arguments, CpuMoE schedule, and the kernel set of lvgg's
# that runs it (None: the build's default; _bridge.use_kernels).
CONFIGS = {
    "ggml mul_mat_id": (dict(repack=False), "mul_mat_id", None),  # ggml's plain graph on the mapped file
    "repacked": (dict(repack=True, keep_mapped=False), "mul_mat_id", None),  # the memory-lean default
    "repacked, AVX2 kernels": (dict(repack=True, keep_mapped=False), "mul_mat_id", "avx2"),
    "ggml repacked": (dict(repack=True, own_kernels=False), "mul_mat_id", None),  # ggml's interleaved kernels only
    "per-expert": (dict(repack=False), "per_expert", None),
    "auto, both layouts": (dict(repack=True, keep_mapped=True), "auto", None),
}
Q = gguf.GGMLQuantizationType
# Types named by llama.cpp's mixtures, per projection: Q4_K_M keeps down in Q6_K (in half of the
# layers; this benchmark, like the synthetic 30B-A3B file, in all).
MIXES = {"Q4_K_M": {"gate": Q.Q4_K, "up": Q.Q4_K, "down": Q.Q6_K}}
# Qwen3-30B-A3B's MoE layer
SHAPE_30B_A3B = dict(n_experts=128, hidden=2048, intermediate=768, top_k=8, model_layers=48)


def synthetic_experts_file(path: Path, qtype: gguf.GGMLQuantizationType | dict[str, gguf.GGMLQuantizationType],
                           n_layers: int, n_experts: int, hidden: int, intermediate: int, seed: int = 0) -> Path:
    """Full-size expert tensors of one type (or one per projection): one random expert per
    projection, quantized by ggml and repeated over all experts (speed does not depend on
    values; addresses differ)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    for layer in range(n_layers):
        for proj, (rows, cols) in (("gate", (intermediate, hidden)), ("up", (intermediate, hidden)),
                                   ("down", (hidden, intermediate))):
            qt = qtype[proj] if isinstance(qtype, dict) else qtype
            # a flat importance matrix: IQ1_S, IQ2_XXS and IQ2_XS need one; speed does not depend on it
            one = quantize((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32), qt,
                           imatrix=np.ones(cols, np.float32))
            data = np.ascontiguousarray(np.broadcast_to(one, (n_experts, *one.shape)))
            add_quantized_tensor(writer, tensor_name(layer, proj), data, qt)
    write_all(writer)
    return path


@dataclass
class MoeResult:
    qtype: str
    config: str  # a key of CONFIGS
    tokens: int
    ms_per_layer: float
    model_tokens_per_s: float  # all model_layers on the CPU alone
    active_gb_per_s: float  # expert bytes touched per second (distinct experts per call)


def time_layer(moe: CpuMoE, layers: list[int], tokens: int, top_k: int, n_experts: int, hidden: int,
               bytes_per_expert: int, min_seconds: float, rng: np.random.Generator) -> tuple[float, float]:
    """(seconds per layer call, active expert bytes per second) with fresh random routing per call."""
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    out = np.empty_like(x)
    # Enough routes that (route, layer) pairs do not repeat within a run: a big last-level cache (the
    # rig's VM) held the experts of 16 routes x 8 layers and read above the memory's bandwidth.
    routes = [np.argsort(rng.random((tokens, n_experts)), axis=1)[:, :top_k].astype(np.int32) for _ in range(256)]
    w = np.full((tokens, top_k), 1.0 / top_k, np.float32)
    for i in range(2):  # warm-up
        moe(layers[i % len(layers)], x, routes[i], w, out)
    calls, active, start = 0, 0, time.perf_counter()
    while True:
        ids = routes[calls % len(routes)]
        moe(layers[calls % len(layers)], x, ids, w, out)
        calls += 1
        active += len(np.unique(ids)) * bytes_per_expert
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 3:
            return elapsed / calls, active / elapsed


def bench_moe(types: list[str], tokens: list[int], threads: int, n_layers: int, min_seconds: float,
              workdir: str | None = None, configs: tuple[str, ...] = tuple(CONFIGS), experts_file: str | None = None,
              progress: Callable[[str], None] | None = None, **shape) -> list[MoeResult]:
    """Every engine configuration on a synthetic file per type, or on the layers of
    ``experts_file`` (any GGUF lvgg reads: a llama.cpp one, split, or org/repo:QUANT); ``progress``
    is told what starts (a file written, a configuration timed)."""
    def engines(path: Path, K: int):
        for config in configs:
            store_args, schedule, kernels = CONFIGS[config]
            with kernels_in_use(kernels):
                store = ExpertStore(path, **store_args)
                yield config, store, CpuMoE(store, threads=threads, max_tokens=max(tokens), max_top_k=K,
                                            schedule=schedule)

    if experts_file is not None:
        return _time_engines(experts_file, file_label(experts_file), tokens, min_seconds, engines,
                             {**SHAPE_30B_A3B, **shape}, progress)
    return _bench(types, tokens, n_layers, min_seconds, workdir, engines, shape, progress)


def default_configs() -> list[str]:
    """Every configuration whose kernel set the build has and is not its default already."""
    features = _bridge.cpu_features()
    return [c for c, (_, _, kernels) in CONFIGS.items()
            if kernels is None or (kernels in features["lvgg_kernel_sets"] and kernels != features["lvgg_kernels"])]


@contextlib.contextmanager
def kernels_in_use(kernels: str | None):
    """lvgg's kernel set ``kernels`` in use while a configuration is measured (None: as it is)."""
    if kernels is None:
        yield
        return
    before = _bridge.cpu_features()["lvgg_kernels"]
    _bridge.use_kernels(kernels)  # ValueError where the build lacks it
    try:
        yield
    finally:
        _bridge.use_kernels(before)


def file_label(path: str) -> str:
    """The expert types of a file, as a row label: one type, or gate/up/down's (e.g. Q4_K/Q4_K/Q6_K)."""
    store = ExpertStore(path, repack=False)
    per_layer = {"/".join(store.layer_info(layer).types.values()).upper() for layer in store.layers}
    if len(per_layer) > 1:
        return "mixed"
    (types,) = per_layer
    return types.split("/")[0] if len(set(types.split("/"))) == 1 else types


def bench_nodes(types: list[str], tokens: list[int], threads: int, node_counts: list[int], n_layers: int,
                min_seconds: float, workdir: str | None = None, own_kernels: bool = True,
                **shape) -> list[MoeResult]:
    """The same layers with the physical cores split into 1, 2, 4, ... virtual nodes (pinned CPU
    groups, one part of every expert each): the cost of splitting on one socket. ``own_kernels``:
    as ExpertStore's (False: ggml's kernels for every type)."""
    from lvgg import _bridge
    from lvgg.experts import EngineNode

    cpus = _bridge.physical_core_cpus()[:threads]

    def engines(path: Path, K: int):
        for n in node_counts:
            store = ExpertStore(path, repack=n == 1, own_kernels=own_kernels)  # with nodes, each part is repacked
            nodes = [EngineNode(list(g)) for g in np.array_split(cpus, n)]
            yield f"{n} node{'s' * (n > 1)}", store, CpuMoE(store, nodes=nodes, max_tokens=max(tokens), max_top_k=K)

    return _bench(types, tokens, n_layers, min_seconds, workdir, engines, shape)


class Ranks:
    """Tensor- or expert-parallel ranks of one machine, each an engine on cores of its own: a call
    runs them all at once (the engines release the GIL) and sums their outputs, as vLLM's
    all-reduce does, so it takes as long as the slowest rank of that call."""

    def __init__(self, engines: list[CpuMoE]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.engines = engines
        self._pool = ThreadPoolExecutor(len(engines) - 1)
        self._outs: list[np.ndarray] = []

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
        if not self._outs or self._outs[0].shape != out.shape:
            self._outs = [np.empty_like(out) for _ in self.engines]
        waits = [self._pool.submit(moe, layer, x, ids, w, o) for moe, o in zip(self.engines[1:], self._outs[1:])]
        self.engines[0](layer, x, ids, w, self._outs[0])
        for wait in waits:
            wait.result()
        np.sum(self._outs, axis=0, out=out)


def bench_ranks(types: list[str], tokens: list[int], threads: int, ranks: int, n_layers: int, min_seconds: float,
                workdir: str | None = None, own_kernels: bool = True, **shape) -> list[MoeResult]:
    """One engine on ``threads`` cores against ``ranks`` engines splitting those cores, each on its
    part of the experts (ExpertStore.part), called at once with the same routing: by rows (vLLM's
    share of every expert) on even cores; by blocks of down (what the plugin gives ranks sharing a
    NUMA node) on cores in proportion to their parts' bytes; by whole experts (expert parallel) on
    even cores."""
    from lvgg import topology

    cpus = _bridge.physical_core_cpus()[:threads]

    def engines(path: Path, K: int):
        store = ExpertStore(path, own_kernels=own_kernels)
        yield "1 rank", store, CpuMoE(store, threads=len(cpus), cpus=cpus, max_tokens=max(tokens), max_top_k=K)
        whole = ExpertStore(path, repack=False, own_kernels=own_kernels)
        for by, weighted in (("rows", False), ("blocks", True), ("experts", False)):
            if by == "blocks" and whole.max_parts("blocks") < ranks:
                continue  # fewer blocks than ranks: the plugin splits by rows
            weights = [whole.part_bytes(r, ranks, by) for r in range(ranks)] if weighted else [1] * ranks
            groups = topology.split_cpus(cpus, weights)
            moes = []
            for rank, group in enumerate(groups):
                with topology.bound_to(group):  # the part's copy is made by its rank's cores, as in the plugin
                    part = whole.part(rank, ranks, by=by)
                moes.append(CpuMoE(part, threads=len(group), cpus=group, max_tokens=max(tokens), max_top_k=K))
            cores = "/".join(str(len(g)) for g in groups)
            yield f"{ranks} ranks, {by}" + (f" ({cores} cores)" if weighted else ""), whole, Ranks(moes)

    return _bench(types, tokens, n_layers, min_seconds, workdir, engines, shape)


def scratch_dir(parent: str | None) -> tempfile.TemporaryDirectory:
    """A temporary folder for a benchmark's files (removed after its ``with``), inside ``parent``
    (made if missing; e.g. a disk with room for full-size experts files) or the system's."""
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=parent)


def _bench(types: list[str], tokens: list[int], n_layers: int, min_seconds: float, workdir: str | None,
           engines, shape: dict, progress: Callable[[str], None] | None = None) -> list[MoeResult]:
    """Time every engine ``engines(path, top_k)`` yields (label, store, moe) on a synthetic file per type."""
    shape = {**SHAPE_30B_A3B, **shape}
    E, D, F = shape["n_experts"], shape["hidden"], shape["intermediate"]
    results = []
    with scratch_dir(workdir) as tmp:
        for name in types:
            qtype = MIXES.get(name.upper()) or gguf.GGMLQuantizationType[name.upper()]
            if progress:
                progress(f"{name.upper()}: writing a synthetic file of {n_layers} layers of {E} experts, {D}x{F}")
            path = synthetic_experts_file(Path(tmp) / f"{name}.gguf", qtype, n_layers, E, D, F)
            results += _time_engines(path, name.upper(), tokens, min_seconds, engines, shape, progress)
            os.unlink(path)
    return results


def _time_engines(path, name: str, tokens: list[int], min_seconds: float, engines, shape: dict,
                  progress: Callable[[str], None] | None = None) -> list[MoeResult]:
    """Time every engine ``engines(path, top_k)`` yields on the file's layers (its own sizes)."""
    rng = np.random.default_rng(0)
    results = []
    for label, store, moe in engines(path, shape["top_k"]):
        if progress:
            progress(f"{name}: timing {label!r} at {', '.join(map(str, tokens))} tokens")
        info = store.layer_info(store.layers[0])
        E, D = info.n_experts, info.hidden_size
        bytes_per_expert = info.nbytes // E
        for t in tokens:
            sec, active = time_layer(moe, store.layers, t, shape["top_k"], E, D, bytes_per_expert, min_seconds, rng)
            results.append(MoeResult(name, label, t, sec * 1e3, t / (sec * shape["model_layers"]), active / 1e9))
        del moe, store
    return results


def cuda_ms(fn, repeat: int = 3) -> float:
    """Best time of fn() in ms over ``repeat`` runs, by CUDA events on the current stream."""
    import torch

    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def read_bandwidth_gb_per_s(threads: int, nbytes: int = 2 << 30) -> float:
    cpus = _bridge.physical_core_cpus()
    return _bridge.read_bandwidth(nbytes, threads, cpus[:threads]) / 1e9
