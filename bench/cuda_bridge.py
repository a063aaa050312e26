"""Cost of the CUDA bridge: one 30B-A3B MoE layer on the CPU, called directly with CPU tensors
vs through CudaExperts with CUDA tensors (eager, and replayed from a CUDA graph of all layers).

    python bench/cuda_bridge.py [--type Q4_K] [--layers 8] [--tokens 1,8] [--threads N] [--tiny]

Routing is random and new at every step (cold experts, as in decode). --tiny uses experts of
256x256 (16 of them): the CPU's work is then a few microseconds, so the CUDA columns show the
bridge's own cost per layer call (copies, telling the CPU, waking its threads). Each way of
telling the CPU (CudaExperts' signal) gets its own columns. Needs an NVIDIA GPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gguf
import torch

import lvgg
import lvgg.gpu.bridge
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
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    s = dict(hidden=256, n_experts=16, top_k=8, intermediate=256) if a.tiny else SHAPE_30B_A3B
    D, E, K, L = s["hidden"], s["n_experts"], s["top_k"], a.layers
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_experts_file(Path(tmp) / "experts.gguf", gguf.GGMLQuantizationType[a.type], L, E, D,
                                      s["intermediate"])
        moe = lvgg.CpuMoE(lvgg.ExpertStore(path), threads=a.threads or None, max_tokens=512, max_top_k=K)
        bw = read_bandwidth_gb_per_s(moe.threads)
        bridges = {signal: lvgg.CudaExperts(moe, hidden_size=D, top_k=K, max_tokens=512, dtype=torch.bfloat16,
                                            signal=signal) for signal in lvgg.gpu.bridge.SIGNALS}
        print(f"{a.type}, {L} layers of {E} experts {D}x{s['intermediate']}, {moe.threads} threads, "
              f"read bandwidth {bw:.1f} GB/s; the CPU told by: " + ", ".join(
                  f"{name} ({b.signal})" for name, b in bridges.items()))
        columns = ["CPU tensors"] + [f"{how} {name}" for name in bridges for how in ("eager", "graph")]
        print(f"{'tokens':>6} " + " ".join(f"{c:>20}" for c in columns) + "   ms per layer")
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
            times = [per_layer_ms(cpu_step, L, a.steps)]
            for experts in bridges.values():
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

                times += [per_layer_ms(f, L, a.steps) for f in (eager_step, graph_step)]
            print(f"{T:6d} " + " ".join(f"{t:20.3f}" for t in times))
        torch.cuda.synchronize()
        for experts in bridges.values():
            experts.close()


if __name__ == "__main__":
    main()
