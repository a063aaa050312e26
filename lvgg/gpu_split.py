"""A decode step's experts shared between the CPU and the GPU, so both read weights at once.

    split = SplitExperts(gpu, moe, gpu_slots=3, max_tokens=8, dtype=torch.bfloat16)
    out = split(layer, x, topk_ids, topk_weights)      # CUDA tensors, like CudaExperts

A token's first ``top_k - gpu_slots`` experts run on the CPU engine (CudaExperts: pinned
buffers and a host function on the current stream) while, on a side stream, the GPU reads
the other ``gpu_slots`` experts' bytes straight from the pinned experts file over the PCIe
link, dequantizes them and multiplies (GpuExperts.fetched/multiply); the two partial sums are
added. Everything is ordered by events between the two streams and nothing runs Python in
between, so vLLM's CUDA graphs capture it. The CPU's decode time is bound by its memory
bandwidth and the GPU's by the link's: ``calibrate`` times both on one layer and picks the
share that makes them finish together.
"""
from __future__ import annotations

import logging
import time

import torch

from lvgg.cuda_bridge import CudaExperts
from lvgg.experts import CpuMoE
from lvgg.gpu_experts import GpuExperts

log = logging.getLogger("vllm.lvgg")  # vLLM's handlers and level


class SplitExperts:
    """``gpu_slots`` of each token's ``top_k`` experts on the GPU, the rest on the CPU, for calls
    of up to ``max_tokens`` tokens on ``gpu.split_layers`` (``takes``)."""

    def __init__(self, gpu: GpuExperts, moe: CpuMoE, *, gpu_slots: int, max_tokens: int, dtype: torch.dtype) -> None:
        top_k = moe.max_top_k
        if not 1 <= gpu_slots < top_k:
            raise ValueError(f"gpu_slots must be 1..{top_k - 1} (of the {top_k} experts per token), found {gpu_slots}")
        if max_tokens * gpu_slots > gpu.split_experts:
            raise ValueError(f"{max_tokens} tokens x {gpu_slots} GPU slots is more than the {gpu.split_experts} "
                             "experts the GPU fetches per call (split_experts)")
        self.gpu, self.gpu_slots, self.max_tokens, self.top_k = gpu, gpu_slots, max_tokens, top_k
        self.cpu_slots = top_k - gpu_slots
        info = moe.store.layer_info(gpu.split_layers[0])
        self.cpu = CudaExperts(moe, hidden_size=info.hidden_size, top_k=self.cpu_slots, max_tokens=max_tokens,
                               dtype=dtype)
        self._side = torch.cuda.Stream(gpu.device)
        self._inputs_ready, self._gpu_done = torch.cuda.Event(), torch.cuda.Event()
        # the fetched experts are numbered 0..n-1 in token-major order: token t's slot s is t*gpu_slots+s
        self._slot_ids = torch.arange(gpu.split_experts, dtype=torch.int32, device=gpu.device)

    def takes(self, layer: int, n_tokens: int) -> bool:
        return n_tokens <= self.max_tokens and layer in self.gpu.split_layers

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        n, kc = x.shape[0], self.cpu_slots
        if not self.takes(layer, n) or tuple(topk_ids.shape) != (n, self.top_k):
            raise ValueError(f"SplitExperts takes 1..{self.max_tokens} tokens x {self.top_k} experts of layers "
                             f"{self.gpu.split_layers}; found layer {layer}, ids {list(topk_ids.shape)}")
        main = torch.cuda.current_stream(x.device)
        self._inputs_ready.record(main)
        with torch.cuda.stream(self._side):
            self._side.wait_event(self._inputs_ready)
            w13, w2 = self.gpu.fetched(layer, topk_ids[:, kc:].reshape(-1))
            gpu_part = self.gpu.multiply(x, w13, w2, topk_weights[:, kc:].contiguous(),
                                         self._slot_ids[:n * self.gpu_slots].view(n, self.gpu_slots))
            self._gpu_done.record(self._side)
        out = self.cpu(layer, x, topk_ids[:, :kc], topk_weights[:, :kc])
        main.wait_event(self._gpu_done)
        # gpu_part's memory belongs to the side stream, whose next work waits for this add (the
        # next call's _inputs_ready), so the allocator cannot hand it out too early.
        return out.add_(gpu_part)

    def close(self) -> None:
        self.cpu.close()


def calibrate(gpu: GpuExperts, moe: CpuMoE, layer: int, dtype: torch.dtype, repeats: int = 7) -> dict[str, list[float]]:
    """Seconds one token's experts of ``layer`` take with 0..top_k of them on each side: the CPU
    engine alone (``cpu[k]``: k experts) and the GPU's fetch + multiply alone (``gpu[k]``).
    Medians of ``repeats`` runs after a warm-up; outside any graph capture (it synchronizes)."""
    top_k, info = moe.max_top_k, moe.store.layer_info(layer)
    ids = torch.randperm(info.n_experts)[:top_k].to(torch.int32).view(1, top_k)
    weights = torch.full((1, top_k), 1.0 / top_k)
    x = torch.randn(1, info.hidden_size).to(dtype)
    out = torch.empty_like(x)
    xg, idsg, wg = x.to(gpu.device), ids.to(gpu.device), weights.to(gpu.device)

    def cpu_seconds(k: int) -> float:
        return _median(lambda: moe(layer, x, ids[:, :k].contiguous(), weights[:, :k].contiguous(), out), repeats)

    def gpu_seconds(k: int) -> float:
        slots = torch.arange(k, dtype=torch.int32, device=gpu.device).view(1, k)

        def run():
            w13, w2 = gpu.fetched(layer, idsg[0, :k])
            gpu.multiply(xg, w13, w2, wg[:, :k].contiguous(), slots)
            torch.cuda.synchronize(gpu.device)
        return _median(run, repeats)

    return {"cpu": [0.0] + [cpu_seconds(k) for k in range(1, top_k + 1)],
            "gpu": [0.0] + [gpu_seconds(k) for k in range(1, top_k + 1)]}


def best_gpu_slots(seconds: dict[str, list[float]]) -> int:
    """The number of a token's experts to give the GPU so that the slower side is fastest
    (0: the GPU does not help)."""
    top_k = len(seconds["cpu"]) - 1
    return min(range(top_k), key=lambda g: (max(seconds["cpu"][top_k - g], seconds["gpu"][g]), g))


def _median(fn, repeats: int) -> float:
    fn()  # warm-up: kernels compile, pages fault in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
