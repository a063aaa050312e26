"""Where a decode step's MoE time goes when the CPU and the GPU share the experts (lvgg.gpu_split),
next to the CPU alone in the same run. Needs an NVIDIA GPU and vLLM (its fused MoE kernel).

    python bench/gpu_split.py EXPERTS.gguf [--threads 15] [--tokens 1,2,4,8]

Prints the GPU side's parts for one token's top-k experts of one layer (fetch over the link,
with its GB/s; multiply from the fetched bytes; both overlapped as GpuExperts.fetched runs
them), then the time per layer call, replayed in CUDA graphs
as vLLM's decode steps are, for each token count and number of each token's experts on the GPU
(0: the CPU alone): the table `LVGG_GPU_DECODE_SPLIT=auto` picks from at startup.
"""
from __future__ import annotations

import argparse
import time

import torch

import lvgg
from lvgg.gpu_dequant import gated_activations, gather_rows, weighted_down
from lvgg.gpu_experts import GpuExperts, _staged
from lvgg.gpu_split import graph_seconds, best_slots, calibrate


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
    gpu = GpuExperts(store, device="cuda", dtype=dtype, split_layers=store.layers, split_experts=32)
    print(f"experts file pinned and GPU buffers made in {time.perf_counter() - t:.1f} s "
          f"({gpu.vram_bytes / 2**30:.2f} GiB of VRAM)")
    top_k, layer = moe.max_top_k, store.layers[len(store.layers) // 2]
    info = store.layer_info(layer)
    plan = gpu._fetch_plan[layer]  # per projection: (ggml type, its bytes as [experts, bytes of one], name)
    per_expert = [host_rows.shape[1] for _, host_rows, _ in plan]
    ids = torch.randperm(info.n_experts)[:top_k].to(torch.int32).cuda()
    fetched = [torch.empty(top_k, n, dtype=torch.uint8, device="cuda") for n in per_expert]
    x = torch.randn(1, info.hidden_size, dtype=dtype, device="cuda")
    w = torch.full((1, top_k), 1 / top_k, device="cuda")
    staged = [p for (ggml_type, _, name), data in zip(plan, fetched) for p in _staged(info, name, ggml_type, data)]
    fetch = graph_seconds(lambda: [gather_rows(host_rows, ids, out) for (_, host_rows, _), out in zip(plan, fetched)],
                          20)
    multiply = graph_seconds(lambda: weighted_down(gated_activations(x, staged[0], staged[1], top_k), staged[2], w,
                                                   dtype), 20)
    whole = graph_seconds(lambda: gpu.fetched(layer, x, ids.view(1, top_k), w), 20)
    print(f"GPU side, one token's {top_k} experts of layer {layer} ({sum(per_expert) / 2**20:.2f} MiB each), in "
          f"CUDA graphs: fetch {fetch * 1e3:.3f} ms ({top_k * sum(per_expert) / fetch / 1e9:.1f} GB/s), multiply "
          f"from the bytes {multiply * 1e3:.3f} ms, both as fetched() runs them {whole * 1e3:.3f} ms")

    xc, wc, out = x.cpu(), w.cpu(), torch.empty(1, info.hidden_size, dtype=dtype)
    idsc = ids.cpu().view(1, top_k)
    engine = min(_seconds(lambda: moe(layer, xc, idsc, wc, out)) for _ in range(5))
    print(f"CPU engine alone, one token (no CUDA): {engine * 1e3:.3f} ms")

    seconds = calibrate(gpu, moe, dtype, token_counts=[int(n) for n in a.tokens.split(",")], repeats=10)
    width = max(len(v) for v in seconds.values())
    print(f"\nms per layer call, CUDA graphs of 8 layers, {a.threads} CPU threads; columns: experts per token on the GPU")
    print(f"{'tokens':>6} " + " ".join(f"{g:>7}" for g in range(width)) + "   best")
    best = best_slots(seconds)
    for n, times in seconds.items():
        print(f"{n:6d} " + " ".join(f"{t * 1e3:7.3f}" for t in times) + " " * 8 * (width - len(times)) +
              f"   {best[n]} ({times[0] / times[best[n]]:.2f}x the CPU alone)")


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
