"""Cost of the CUDA bridge: one 30B-A3B MoE layer on the CPU, called directly with CPU tensors
vs through CudaExperts with CUDA tensors (eager, and replayed from a CUDA graph of all layers).

    python bench/cuda_bridge.py [--type Q4_K] [--layers 8] [--tokens 1,8] [--threads N]

Routing is random and new at every step (cold experts, as in decode). Needs an NVIDIA GPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gguf
import torch

import lvgg
from lvgg.bench import SHAPE_30B_A3B, read_bandwidth_gb_per_s, synthetic_experts_file


def per_layer_ms(step, layers: int, steps: int) -> float:
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps / layers * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    s = SHAPE_30B_A3B
    D, E, K, L = s["hidden"], s["n_experts"], s["top_k"], a.layers
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_experts_file(Path(tmp) / "experts.gguf", gguf.GGMLQuantizationType[a.type], L, E, D,
                                      s["intermediate"])
        moe = lvgg.CpuMoE(lvgg.ExpertStore(path), threads=a.threads or None, max_tokens=512, max_top_k=K)
        bw = read_bandwidth_gb_per_s(moe.threads)
        experts = lvgg.CudaExperts(moe, hidden_size=D, top_k=K, max_tokens=512, dtype=torch.bfloat16)
        print(f"{a.type}, {L} layers, {moe.threads} threads, read bandwidth {bw:.1f} GB/s")
        print(f"{'tokens':>6} {'CPU tensors':>12} {'CUDA eager':>11} {'CUDA graph':>11}   ms per layer")
        for T in (int(t) for t in a.tokens.split(",")):
            g = torch.Generator().manual_seed(T)
            routes = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int() for _ in range(64)]
            x = torch.randn(T, D, generator=g).bfloat16()
            w = torch.full((T, K), 1.0 / K)
            out = torch.empty_like(x)

            def cpu_step(i):
                for layer in range(L):
                    moe(layer, x, routes[(i + layer) % 64], w, out)

            xg, wg = x.cuda(), w.cuda()
            routes_g = [r.cuda() for r in routes]
            ids_g = routes_g[0].clone()

            def layers_on_gpu():
                h = xg
                for layer in range(L):
                    h = experts(layer, h, ids_g, wg) * 0.01 + xg  # a residual keeps values sane
                return h

            def eager_step(i):
                ids_g.copy_(routes_g[i % 64])
                layers_on_gpu()

            layers_on_gpu()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                layers_on_gpu()

            def graph_step(i):
                ids_g.copy_(routes_g[i % 64])
                graph.replay()

            times = [per_layer_ms(f, L, a.steps) for f in (cpu_step, eager_step, graph_step)]
            print(f"{T:6d} {times[0]:12.3f} {times[1]:11.3f} {times[2]:11.3f}")


if __name__ == "__main__":
    main()
