"""Every expert type on the GPU paths, Qwen3-30B-A3B layer shapes: streamed prefill and resident layers.

Per type (a synthetic experts file of that type, ``--layers`` layers): one streamed prefill
pass of ``--tokens`` tokens over every layer (tok/s, and the floor the link sets: the layers'
bytes over the host-to-device copy speed measured in the same run), and one resident layer
kept as its quantized bytes against the same layer dequantized: VRAM per layer and the time of
a layer call at 1 and 8 tokens (decode steps, replayed from a CUDA graph as vLLM does).

    python bench/gpu_types.py [--types Q4_K_M,IQ4_XS,MXFP4,...] [--layers 8] [--tokens 4096]

Needs an NVIDIA GPU and vLLM's CUDA build.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import gguf
import torch

import lvgg
from lvgg.bench import MIXES, SHAPE_30B_A3B, cuda_ms, synthetic_experts_file
from lvgg.gpu.experts import GpuExperts, layer_infos, staged_bytes

TYPES = ("Q4_K_M,Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ1_S,IQ1_M,IQ2_XXS,IQ2_XS,IQ2_S,IQ3_XXS,IQ3_S,"
         "IQ4_NL,IQ4_XS,MXFP4,BF16")



def routing(T: int, e: int, d: int, k: int):
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.rand(T, e, device="cuda", generator=g).argsort(dim=1)[:, :k].to(torch.int32)
    return x, ids, torch.softmax(torch.randn(T, k, device="cuda", generator=g), dim=-1)


def graph_ms(gpu: GpuExperts, layer: int, T: int, e: int, d: int, k: int) -> float:
    """A resident layer's call at T tokens, captured once in a CUDA graph and replayed."""
    x, ids, w = routing(T, e, d, k)
    gpu(layer, x, ids, w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gpu(layer, x, ids, w)
    return cuda_ms(graph.replay)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    e, d, f, k = (SHAPE_30B_A3B[n] for n in ("n_experts", "hidden", "intermediate", "top_k"))
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        for name in a.types.split(","):
            qtype = MIXES.get(name.upper()) or gguf.GGMLQuantizationType[name.upper()]
            path = synthetic_experts_file(Path(tmp) / f"{name}.gguf", qtype, a.layers, e, d, f)
            store = lvgg.ExpertStore(path, repack=False)  # the GPU reads the file's bytes
            layers = store.layers
            layer_bytes = staged_bytes(layer_infos(store)[layers[0]])
            streamed = GpuExperts(store, device="cuda", dtype=torch.bfloat16, streamed_layers=layers)
            copy_ms = cuda_ms(lambda: streamed._stage(layers[1], streamed._groups[0], streamed._staging[0]))
            x, ids, w = routing(a.tokens, e, d, k)

            def one_pass():
                h = x
                for layer in layers:
                    h = streamed(layer, h, ids, w) * 0.5 + x * 0.5  # keep values finite, like a residual stream
            pass_ms = cuda_ms(one_pass, repeat=3)
            torch.cuda.synchronize()
            streamed.close()
            resident = {}
            for quantized in (True, False):
                gpu = GpuExperts(store, device="cuda", dtype=torch.bfloat16, resident_layers=[layers[0]],
                                 quantized_resident=quantized)
                # VRAM per resident layer: its bytes (the weights longer passes use are shared by all of them)
                per_layer = layer_bytes if quantized else gpu.vram_bytes
                resident[quantized] = (per_layer / 2**20, graph_ms(gpu, layers[0], 1, e, d, k),
                                       graph_ms(gpu, layers[0], 8, e, d, k))
                del gpu
            rows.append((name.upper(), layer_bytes / 2**20, a.tokens / pass_ms * 1e3,
                         a.tokens / (len(layers) * copy_ms) * 1e3, layer_bytes / copy_ms / 1e6, resident))
            del store
            path.unlink()
    print(f"\n30B-A3B layer shapes (E={e}, D={d}, F={f}, top-{k}); prefill: {a.tokens} tokens "
          f"over {a.layers} streamed layers; resident: one layer, CUDA graph replay")
    print(f"{'type':>8} {'MiB/layer':>10} {'prefill tok/s':>14} {'link floor':>11} {'H2D GB/s':>9} "
          f"{'VRAM MiB q/deq':>15} {'1 tok ms q/deq':>15} {'8 tok ms q/deq':>15}")
    for name, mib, tps, floor, gbs, r in rows:
        print(f"{name:>8} {mib:10.0f} {tps:14.0f} {floor:11.0f} {gbs:9.1f} {r[True][0]:7.0f}/{r[False][0]:<7.0f} "
              f"{r[True][1]:7.3f}/{r[False][1]:<7.3f} {r[True][2]:7.3f}/{r[False][2]:<7.3f}")


if __name__ == "__main__":
    main()
