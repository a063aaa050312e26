"""lvgg's series in vLLM's /metrics (Prometheus), named as vLLM names its own (``vllm:...``):

    lvgg:expert_layer_seconds{path}     histogram: seconds per MoE layer call, by where it ran:
                                        "cpu" (the CPU engine; in a split decode step, the CPU's
                                        share), "gpu_streamed" (experts streamed for a long pass) or
                                        "gpu_resident" (outside CUDA graphs)
    lvgg:expert_tokens_total{path}      tokens those calls computed
    lvgg:pcie_bytes_total{path}         expert bytes copied from host memory to the GPU: "gpu_streamed",
                                        or "gpu_split" (the experts a split decode step fetches)
    lvgg:cpu_threads                    threads of the CPU engines (all ranks of the machine)
    lvgg:gpu_resident_layers            MoE layers whose experts stay on the GPU
    lvgg:decode_split_gpu_experts{tokens}  the decode split's choice: of a token's top_k experts,
                                        how many the GPU takes at batches of up to ``tokens``
    lvgg:experts_file_bytes{path}       the experts file in use, its size

The engine runs in vLLM's worker processes and /metrics is served by its API server: `lvgg serve`
gives them a shared Prometheus directory (PROMETHEUS_MULTIPROC_DIR, as vLLM does for several API
servers), where every process's series add up. The CPU engine counts its calls itself (in C++,
CUDA-graph replays included), and so does the decode split's routing kernel on the GPU (the experts
it fetches, into pinned host memory); a thread of the worker moves the counts to Prometheus every
``PERIOD`` seconds. Other GPU calls are timed with CUDA events outside graph capture.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any

log = logging.getLogger("vllm.lvgg")

PERIOD = 1.0  # seconds between two readings of the CPU engine's counts


class Metrics:
    """The series of one worker process, fed by its runtime."""

    def __init__(self, bounds: list[float]) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.layer_seconds = Histogram("lvgg:expert_layer_seconds", "Seconds per MoE layer call of lvgg's routed "
                                       "experts, by where it ran", ["path"], buckets=bounds)
        self.tokens = Counter("lvgg:expert_tokens", "Tokens computed by lvgg's routed experts, by where", ["path"])
        self.pcie_bytes = Counter("lvgg:pcie_bytes", "Expert bytes copied from host memory to the GPU", ["path"])
        self.cpu_threads = Gauge("lvgg:cpu_threads", "Threads of lvgg's CPU engines", multiprocess_mode="livesum")
        self.resident_layers = Gauge("lvgg:gpu_resident_layers", "MoE layers whose experts stay on the GPU",
                                     multiprocess_mode="max")
        self.split_experts = Gauge("lvgg:decode_split_gpu_experts", "Of a token's top_k experts, how many the GPU "
                                   "takes in decode steps of up to `tokens` tokens", ["tokens"],
                                   multiprocess_mode="max")
        self.file_bytes = Gauge("lvgg:experts_file_bytes", "The experts file lvgg computes from, its size",
                                ["path"], multiprocess_mode="max")
        self._cpu_seen: dict[str, Any] | None = None
        self._pending: collections.deque = collections.deque()  # GPU calls whose events are not done yet
        self._lock = threading.Lock()
        self._engine = None
        self._split = None  # the decode split (SplitExperts) whose fetches are counted
        self._split_seen = 0
        self._thread: threading.Thread | None = None

    def watch_engine(self, engine, experts_file: str) -> None:
        """Export ``engine``'s (a CpuMoE's) calls from now on, and what it is."""
        with self._lock:  # flush() reads the pair
            self._engine, self._cpu_seen = engine, engine.call_stats()
        self.cpu_threads.set(engine.threads)
        self.file_bytes.labels(path=experts_file).set(os.path.getsize(experts_file))
        if self._thread is None:  # one reader per process, of whichever engine it watches
            self._thread = threading.Thread(target=self._run, name="lvgg-metrics", daemon=True)
            self._thread.start()

    def gpu_made(self, resident_layers: int, split) -> None:
        """The GPU's experts are made: their resident layers, and the decode split (a SplitExperts
        or None) whose choice is shown and whose fetches are counted from now on."""
        self.resident_layers.set(resident_layers)
        for tokens, experts in (split.slots if split else {}).items():
            self.split_experts.labels(tokens=str(tokens)).set(experts)
        with self._lock:
            self._split, self._split_seen = split, split.fetched_bytes() if split else 0

    def time_gpu(self, path: str, tokens: int, nbytes: int):
        """Events around a GPU call on the current stream (None inside a graph capture: not timed)."""
        import torch

        if torch.cuda.is_current_stream_capturing():
            return None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return _GpuCall(self, path, tokens, nbytes, start, end)

    def flush(self) -> None:
        """Move what was counted since the last reading to Prometheus."""
        with self._lock:
            if self._engine is not None:
                now = self._engine.call_stats()
                seen, self._cpu_seen = self._cpu_seen, now
                counts = [a - b for a, b in zip(now["counts"], seen["counts"])]
                add_to_histogram(self.layer_seconds.labels(path="cpu"), counts, now["seconds"] - seen["seconds"])
                if now["tokens"] > seen["tokens"]:
                    self.tokens.labels(path="cpu").inc(now["tokens"] - seen["tokens"])
            if self._split is not None:
                fetched, seen = self._split.fetched_bytes(), self._split_seen
                if fetched > seen:
                    self.pcie_bytes.labels(path="gpu_split").inc(fetched - seen)
                    self._split_seen = fetched
            while self._pending and self._pending[0].end.query():
                call = self._pending.popleft()
                self.layer_seconds.labels(path=call.path).observe(call.start.elapsed_time(call.end) / 1e3)
                self.tokens.labels(path=call.path).inc(call.tokens)
                self.pcie_bytes.labels(path=call.path).inc(call.nbytes)

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(PERIOD):
            try:
                self.flush()
            except Exception as e:  # metrics must never stop the server
                log.warning("lvgg: metrics stopped: %s: %s", type(e).__name__, e)
                return


class _GpuCall:
    def __init__(self, metrics: Metrics, path: str, tokens: int, nbytes: int, start, end) -> None:
        self.metrics, self.path, self.tokens, self.nbytes, self.start, self.end = metrics, path, tokens, nbytes, start, end

    def done(self) -> None:
        self.end.record()
        with self.metrics._lock:
            self.metrics._pending.append(self)


def add_to_histogram(child, counts: list[int], seconds: float) -> None:
    """Add calls counted by bucket (non-cumulative, the histogram's own bounds) and their seconds to a
    prometheus_client histogram child, as that many observe() calls would. It adds to the child's
    per-bucket values and sum as observe() does (prometheus_client keeps them non-cumulative and
    sums at exposition); tests/test_serve.py scrapes the result."""
    if not any(counts):
        return
    for bucket, n in zip(child._buckets, counts):
        if n:
            bucket.inc(n)
    child._sum.inc(seconds)


_metrics: Metrics | None = None


def process_metrics(bounds: list[float]) -> Metrics | None:
    """This process's series, made at the first call; None where prometheus_client cannot make them."""
    global _metrics
    if _metrics is None:
        try:
            _metrics = Metrics(bounds)
        except Exception as e:  # e.g. a second registration in one process: no metrics, the server runs
            log.warning("lvgg: no metrics in this process: %s: %s", type(e).__name__, e)
            return None
    return _metrics
