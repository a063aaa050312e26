"""A decode step's experts shared between the CPU and the GPU, so both read weights at once.

    split = SplitExperts(gpu, cpu, slots={1: 3, 2: 2, 4: 1})   # cpu: the CudaExperts to share
    out = split(layer, x, topk_ids, topk_weights)      # CUDA tensors, like CudaExperts

For a call of n tokens, ``slots`` (by the smallest listed token count >= n) gives g: the GPU
takes g/top_k of the step's distinct experts (g of one token's). A small kernel shares them
out on the device (lvgg.gpu.dequant.split_routing): the CPU engine computes the step with the
GPU's experts masked out of its ids (CudaExperts: pinned buffers, in the current stream's
order) while, on a side stream, the GPU reads each of its experts' bytes once, straight from
the pinned experts file over the PCIe link, and multiplies them from those bytes for every
token that chose them (GpuExperts.fetched); the two partial sums are added. Events order the
two streams and no Python runs in between, so vLLM's CUDA graphs capture it. Both sides' time
is bound by the bytes they read, the CPU's by its memory bandwidth and the GPU's by the link's:
``calibrate`` replays both ways in CUDA graphs and picks the fastest g per token count.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from lvgg.gpu.bridge import CudaExperts
from lvgg.gpu.dequant import split_routing
from lvgg.gpu.experts import GpuExperts, link_bytes

# The most tokens a split call takes: split_routing compares each of a call's tokens x top_k
# slots with every other in one program (16 x 8 slots: 128 x 128).
MOST_TOKENS = 16


class SplitExperts:
    """Decode calls of ``gpu.split_layers`` with some of their experts on the GPU.

    slots: {token count: g}, the GPU's share of a call's distinct experts in g/top_k (g of one
    token's experts), but no more experts than the GPU fetches per call (``gpu.split_experts``:
    the CPU keeps the rest); a call of n tokens uses the entry of the smallest count >= n, and is
    not taken (``takes``) past the largest or where that entry is 0.
    count_fetches: count the experts each layer's calls fetch over the link (``fetched_bytes``),
    on the device as the calls run, CUDA graph replays included, into pinned host memory.
    """

    def __init__(self, gpu: GpuExperts, cpu: CudaExperts, *, slots: dict[int, int], count_fetches: bool = False) -> None:
        top_k = cpu.top_k
        for n, g in slots.items():
            if not 0 <= g < top_k:
                raise ValueError(f"the GPU's share must be 0..{top_k - 1} (of {top_k}: the CPU keeps a part), "
                                 f"found {g} for {n} tokens")
            if not 1 <= n <= MOST_TOKENS:
                raise ValueError(f"split calls take 1..{MOST_TOKENS} tokens, found {n}")
        self.gpu, self.cpu, self.slots = gpu, cpu, dict(sorted(slots.items()))
        self.max_tokens = max(slots) if slots else 0
        if self.max_tokens > cpu.max_tokens:
            raise ValueError(f"calls of up to {self.max_tokens} tokens need a CudaExperts of as many rows; this one "
                             f"takes {cpu.max_tokens}")
        self._layers = frozenset(gpu.split_layers)
        # The experts this rank's GPU and CPU hold (an expert-parallel rank's: [first, end), whole):
        # the routing leaves the others out, so that neither side computes them here.
        self._held = gpu.layer_info(gpu.split_layers[0]).held_experts if gpu.split_layers else None
        self._slots_of = [slots_for(slots, n) for n in range(self.max_tokens + 1)]  # by token count
        # Experts fetched by each split layer's calls so far, added up by the routing kernel on the
        # device and mirrored into pinned host memory, which fetched_bytes() reads.
        n = len(gpu.split_layers) if count_fetches else 0
        counts, self._fetches = (torch.zeros(n, dtype=torch.int64, device=gpu.device),
                                 torch.zeros(n, dtype=torch.int64, pin_memory=True)) if n else (None, None)
        self._fetches_of = {layer: (counts[i:i + 1], self._fetches[i:i + 1]) for i, layer in enumerate(gpu.split_layers)
                            if n}
        self._expert_bytes = [link_bytes(gpu.layer_info(layer), 1) for layer in gpu.split_layers]
        self._side = torch.cuda.Stream(gpu.device)
        self._inputs_ready, self._gpu_done = torch.cuda.Event(), torch.cuda.Event()

    def gpu_slots(self, n_tokens: int) -> int:
        """The GPU's share of a call of ``n_tokens``, g of top_k (0: none)."""
        return self._slots_of[n_tokens] if n_tokens <= self.max_tokens else 0

    def takes(self, layer: int, n_tokens: int) -> bool:
        return self.gpu_slots(n_tokens) > 0 and layer in self._layers

    def route(self, topk_ids: torch.Tensor, real_rows: torch.Tensor | None = None, layer: int | None = None):
        """How a call with these ids is shared out (``split_routing``'s cpu_ids, gpu_experts,
        slot_expert): the GPU's share for the call's token count, at most the experts it fetches
        (counted as ``layer``'s where this split counts them)."""
        counts, mirror = self._fetches_of.get(layer, (None, None))
        return split_routing(topk_ids, self.gpu_slots(topk_ids.shape[0]), real_rows, most=self.gpu.split_experts,
                             held=self._held, counts=counts, counts_mirror=mirror)

    def fetched_bytes(self) -> int:
        """Expert bytes the calls so far fetched over the link (0 unless made with count_fetches;
        calls still running on the device may be missing). Reads host memory only: no CUDA call."""
        if self._fetches is None:
            return 0
        return sum(n * nbytes for n, nbytes in zip(self._fetches.tolist(), self._expert_bytes))

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 real_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Like CudaExperts' call (real_rows too: padding rows come back 0)."""
        n = x.shape[0]
        if not self.takes(layer, n) or tuple(topk_ids.shape) != (n, self.cpu.top_k):
            raise ValueError(f"SplitExperts takes calls of {self.slots} tokens x {self.cpu.top_k} experts of layers "
                             f"{self.gpu.split_layers}; found layer {layer}, ids {list(topk_ids.shape)}")
        main = torch.cuda.current_stream(x.device)
        cpu_ids, gpu_experts, slot_expert = self.route(topk_ids, real_rows, layer)
        # The CPU's part first: its inputs are copied out before the GPU's part can fill the SMs
        # and the link (measured on the rig: started together, the two parts ran almost in turn).
        out = self.cpu(layer, x, cpu_ids, topk_weights, inputs_copied=self._inputs_ready, real_rows=real_rows)
        with torch.cuda.stream(self._side):
            self._side.wait_event(self._inputs_ready)
            gpu_part = self.gpu.fetched(layer, x, gpu_experts, slot_expert, topk_weights)
            self._gpu_done.record(self._side)
        main.wait_event(self._gpu_done)
        # gpu_part's memory belongs to the side stream, whose next work waits for this add (the
        # next call's _inputs_ready), so the allocator cannot hand it out too early; the routing's
        # tensors belong to this stream, whose later work waits for the side stream's.
        return out.add_(gpu_part)


def slots_for(slots: dict[int, int], n_tokens: int) -> int:
    """The entry of ``slots`` ({token count: GPU share}) for the smallest count >=
    ``n_tokens``; 0 past the largest."""
    return next((g for n, g in sorted(slots.items()) if n >= n_tokens), 0)


def calibrate(gpu: GpuExperts, cpu: CudaExperts, token_counts: Sequence[int] | None = None,
              repeats: int = 5) -> dict[int, list[float]]:
    """{n tokens: seconds per layer call with the GPU's share 0, 1, ... (of top_k)}, for
    ``token_counts`` (default 1, 2, 4, ... MOST_TOKENS, up to the CPU's max_tokens) and the
    shares ``split_shares`` gives.

    Each way is captured in a CUDA graph calling up to 8 split layers in turn, as vLLM's decode
    graphs do; 0 is the CPU alone (``cpu``, which the splits share). The ways are replayed in
    turn, ``repeats`` rounds, so a passing slowdown of the machine weighs on every way alike,
    with new random routing before each replay (the same experts again would be read from the
    CPU's caches, which a decode step never is). Synchronizes: call outside any capture (vLLM's
    profiling run comes first). An expert-parallel rank's routes run over every expert, as the
    router's do, and it computes those it holds."""
    top_k = cpu.top_k
    layers = timed_layers(gpu.split_layers)
    info = cpu.moe.store.layer_info(layers[0])
    if token_counts is None:
        token_counts = [1 << i for i in range(MOST_TOKENS.bit_length()) if 1 << i <= cpu.max_tokens]
    result = {}
    for n in token_counts:
        routes = RandomRoutes(layers, n, top_k, info.routed_experts, gpu.device, seed=n)
        x = torch.randn(n, info.hidden_size, generator=routes.generator).to(gpu.device, cpu.dtype)
        shares = split_shares(n, top_k, info.routed_experts, gpu.split_experts, held=info.n_experts)
        ways = [cpu] + [SplitExperts(gpu, cpu, slots={n: g}) for g in shares]
        times = routes.graphs_seconds([lambda way=way: [way(layer, x, ids, w) for layer, ids, w in routes]
                                       for way in ways], repeats)
        result[n] = [t / len(layers) for t in times]
    return result


def split_shares(n_tokens: int, top_k: int, n_experts: int, split_experts: int, held: int | None = None) -> range:
    """The GPU shares (of top_k) worth timing for calls of ``n_tokens``: 1 up to the first whose
    expected experts, with uniform random routing over ``n_experts``, fill the ``split_experts``
    the GPU fetches per call (past it the GPU's part stays the same), and at most top_k - 1.
    ``held``: the experts the split computes (an expert-parallel rank's; default all)."""
    distinct = (held or n_experts) * (1 - (1 - top_k / n_experts) ** n_tokens)
    return range(1, min(top_k - 1, math.ceil(split_experts * top_k / distinct)) + 1)


def timed_layers(layers: Sequence[int]) -> list[int]:
    """Up to 8 of ``layers``, spread over them: what ``calibrate`` replays."""
    return list(layers[::max(1, len(layers) // 8)][:8])


class RandomRoutes:
    """Routing of n tokens to top_k distinct experts in each of ``layers``, in device tensors
    that a CUDA graph captures; ``graphs_seconds`` draws new routes before each replay.
    Iterating gives (layer, ids [n, top_k] int32, weights [n, top_k] float32)."""

    def __init__(self, layers: Sequence[int], n: int, top_k: int, n_experts: int, device: torch.device,
                 seed: int) -> None:
        self.layers, self.n, self.top_k, self.n_experts = list(layers), n, top_k, n_experts
        self.generator = torch.Generator().manual_seed(seed)
        self.ids = [torch.empty(n, top_k, dtype=torch.int32, device=device) for _ in self.layers]
        self.weights = torch.full((n, top_k), 1.0 / top_k, device=device)
        self.draw()

    def draw(self) -> None:
        for ids in self.ids:
            ids.copy_(torch.stack([torch.randperm(self.n_experts, generator=self.generator)[:self.top_k]
                                   for _ in range(self.n)]))

    def __iter__(self):
        return ((layer, ids, self.weights) for layer, ids in zip(self.layers, self.ids))

    def graphs_seconds(self, fns, repeats: int) -> list[float]:
        """``graphs_seconds`` with new routes drawn before each replay."""
        return graphs_seconds(fns, repeats, before_each=self.draw)


def graphs_seconds(fns, repeats: int, before_each=None) -> list[float]:
    """Seconds one replay of a CUDA graph of each of ``fns`` takes, the median of ``repeats``
    rounds that replay each graph in turn (``before_each()`` runs, untimed, before each replay;
    each fn runs eagerly first, and two rounds run before timing: kernels compile, pages fault
    in)."""
    graphs = []
    for fn in fns:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    times = [[] for _ in graphs]
    for _ in range(repeats + 2):
        for graph, took in zip(graphs, times):
            if before_each is not None:
                before_each()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            took.append(time.perf_counter() - t0)
    return [sorted(took[2:])[repeats // 2] for took in times]


# A split must beat the CPU alone by this much to be kept, and among the splits within
# SPLIT_TIE of the fastest the one with the fewest GPU experts is taken. On the rig, one layer
# call's timing varied by 5-10% between runs, and a larger GPU share both reads more over the
# link and slows the CPU's own reads, which a short timing underrates: end to end, 3 of 8
# experts on the GPU was the fastest in every run (decode and 8 sequences), while the timing
# alone sometimes put 4 a hair ahead or kept the CPU alone at 8 tokens with a 10% margin.
SPLIT_MARGIN = 0.05
SPLIT_TIE = 0.03


def best_slots(seconds: dict[int, list[float]]) -> dict[int, int]:
    """{n tokens: the GPU's share to use (of top_k)} from ``calibrate``'s timings (0:
    the CPU alone, kept unless a split was faster by SPLIT_MARGIN)."""
    def best(times: list[float]) -> int:
        fastest = min(times[1:], default=float("inf"))
        if fastest >= (1 - SPLIT_MARGIN) * times[0]:
            return 0
        return next(g for g in range(1, len(times)) if times[g] <= (1 + SPLIT_TIE) * fastest)

    return {n: best(times) for n, times in seconds.items()}
