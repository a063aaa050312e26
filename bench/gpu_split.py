"""Where a decode step's MoE time goes when the CPU and the GPU share the experts (lvgg.gpu.split),
next to the CPU alone in the same run. Needs an NVIDIA GPU (not vLLM).

    python bench/gpu_split.py EXPERTS.gguf [--threads 15] [--tokens 1,2,4,8]

Prints the GPU side's parts for one token's top-k experts of one layer (fetch over the link,
with its GB/s; multiply from the fetched bytes; both overlapped as GpuExperts.fetched runs
them), then per token count and GPU share g (of top_k; 0: the CPU alone) the time per layer
call of the CPU's part alone, the GPU's part alone and both together, replayed in CUDA graphs
as vLLM's decode steps are, with new routes each replay (what `LVGG_GPU_DECODE_SPLIT=auto`
measures at startup, and its parts), and how many distinct experts each side read on average.
"""
from __future__ import annotations

import argparse
import time

import torch

import lvgg
from lvgg.gpu.dequant import gated_activations, weighted_down
from lvgg.gpu.experts import GpuExperts, _gather, _staged
from lvgg.gpu.bridge import CudaExperts
from lvgg.gpu.split import RandomRoutes, SplitExperts, graphs_seconds, split_shares, timed_layers
from lvgg.plan import SPLIT_EXPERTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experts")
    ap.add_argument("--threads", type=int, default=15)
    ap.add_argument("--tokens", default="1,2,4,8")
    a = ap.parse_args()
    dtype = torch.bfloat16
    store = lvgg.ExpertStore(a.experts)
    moe = lvgg.CpuMoE(store, threads=a.threads)
    t = time.perf_counter()
    gpu = GpuExperts(store, device="cuda", dtype=dtype, split_layers=store.layers, split_experts=SPLIT_EXPERTS)
    print(f"experts pinned and GPU buffers made in {time.perf_counter() - t:.1f} s "
          f"({gpu.vram_bytes / 2**30:.2f} GiB of VRAM)")
    top_k, layer = moe.max_top_k, store.layers[len(store.layers) // 2]
    info = store.layer_info(layer)
    plan = gpu._plan[layer]  # per projection: (name, views of its bytes in host memory, rows of w13)
    per_expert = [sum(view[0].numel() for view in views) for _, views, _ in plan]
    ids = torch.randperm(info.n_experts)[:top_k].to(torch.int32).cuda()
    fetched = [torch.empty(top_k, n, dtype=torch.uint8, device="cuda") for n in per_expert]
    x = torch.randn(1, info.hidden_size, dtype=dtype, device="cuda")
    w = torch.full((1, top_k), 1 / top_k, device="cuda")
    staged = [p for (name, _, _), data in zip(plan, fetched) for p in _staged(gpu.layer_info(layer), name, data)]
    slot_expert = torch.arange(top_k, dtype=torch.int32, device="cuda").view(1, top_k)
    fetch, multiply, whole = graphs_seconds([
        lambda: [_gather(views, ids, out) for (_, views, _), out in zip(plan, fetched)],
        lambda: weighted_down(gated_activations(x, staged[0], staged[1], slot_expert), staged[2], w, slot_expert,
                              dtype),
        lambda: gpu.fetched(layer, x, ids, slot_expert, w)], 20)
    print(f"GPU side, one token's {top_k} experts of layer {layer} ({sum(per_expert) / 2**20:.2f} MiB each), in "
          f"CUDA graphs: fetch {fetch * 1e3:.3f} ms ({top_k * sum(per_expert) / fetch / 1e9:.1f} GB/s), multiply "
          f"from the bytes {multiply * 1e3:.3f} ms, both as fetched() runs them {whole * 1e3:.3f} ms")

    layers = timed_layers(store.layers)
    print(f"\nms per layer call, CUDA graphs of {len(layers)} layers, new routes each replay, {a.threads} CPU "
          "threads: the CPU's part alone, the GPU's part alone, both as SplitExperts runs them")
    for n in (int(v) for v in a.tokens.split(",")):
        routes = RandomRoutes(layers, n, top_k, info.n_experts, gpu.device, seed=n)
        x = torch.randn(n, info.hidden_size, generator=routes.generator).to("cuda", dtype)
        cpu = CudaExperts(moe, hidden_size=info.hidden_size, top_k=top_k, max_tokens=n, dtype=dtype)
        splits = {g: SplitExperts(gpu, cpu, slots={n: g}) for g in split_shares(n, top_k, info.n_experts,
                                                                                 gpu.split_experts)}
        ways = [lambda: [cpu(layer, x, ids, w) for layer, ids, w in routes]]  # each way's parts, timed in turn
        for split in splits.values():
            ways += [lambda split=split: [cpu(layer, x, split.route(ids)[0], w) for layer, ids, w in routes],
                     lambda split=split: [gpu.fetched(layer, x, *split.route(ids)[1:], w) for layer, ids, w in routes],
                     lambda split=split: [split(layer, x, ids, w) for layer, ids, w in routes]]
        times = iter(routes.graphs_seconds(ways, 10))
        for g in [0, *splits]:
            parts = [next(times) for _ in range(3 if g else 1)]
            shares_read = ""
            if g:
                cpu_ids, gpu_experts, _ = splits[g].route(routes.ids[0])
                shares_read = (f"  (distinct experts: CPU {cpu_ids[cpu_ids >= 0].unique().numel()}, "
                               f"GPU {int((gpu_experts >= 0).sum())})")
            print(f"{n:3d} tokens, GPU share {g} of {top_k}: " +
                  " / ".join(f"{t / len(routes.layers) * 1e3:.3f}" for t in parts) + shares_read)
        cpu.close()

if __name__ == "__main__":
    main()
