"""Where a streamed-experts prefill pass spends its time, layer by layer, without vLLM's model.

For each token count: one pass over every MoE layer of the experts file as vLLM's forward
would call it (random hidden states and routing), timed end to end, next to what each stage
costs alone: the host-to-device copy of a layer's bytes (and the link speed it reaches),
our dequantization kernels, and vLLM's fused MoE kernel on the dequantized weights. The
floor of a pass is max(copy, dequantize + matmuls) per layer when the two overlap.

    python bench/gpu_prefill.py EXPERTS.gguf [--tokens 512,4096,16384] [--top-k 8] [--groups all,32] [--parts 1,2]

--groups compares whole layers with layers streamed a group of experts at a time (what a
GPU too small for one layer of dequantized experts gets). --parts 2 streams the first of two
shares of every expert (a tensor-parallel rank's of two: its intermediate rows, read from the
whole file by 2-d copies where a whole layer is one copy).

Needs an NVIDIA GPU and vLLM's CUDA build.
"""
from __future__ import annotations

import argparse

import torch

import lvgg
from lvgg.bench import cuda_ms
from lvgg.gpu.experts import GpuExperts, layer_infos, staged_bytes



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experts")
    ap.add_argument("--tokens", default="512,4096,16384")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--groups", default="all",
                    help="experts streamed at once, comma-separated ('all': whole layers; e.g. all,32)")
    ap.add_argument("--parts", default="1", help="shares of every expert, comma-separated: the first is streamed")
    a = ap.parse_args()
    store = lvgg.ExpertStore(a.experts, repack=False)  # the GPU reads the mapped bytes only
    layers = store.layers
    rows = []
    for parts, most in ((int(p), None if g == "all" else int(g)) for p in a.parts.split(",")
                        for g in a.groups.split(",")):
        infos = layer_infos(store, (0, parts))
        info = infos[layers[0]]
        e, d = info.n_experts, info.hidden_size
        layer_bytes = sum(staged_bytes(i) for i in infos.values()) / len(layers)
        print(f"{store.path}, share 1 of {parts}: {len(layers)} layers, {layer_bytes / 2**20:.0f} MiB of experts per "
              f"layer, types {info.types}")
        gpu = GpuExperts(store, device="cuda", dtype=torch.bfloat16, streamed_layers=layers, stream_group=most,
                         part=(0, parts))
        group = gpu._groups[0]
        group_bytes = layer_bytes * len(group) / e
        copy_ms = cuda_ms(lambda: gpu._stage(layers[1], group, gpu._staging[0]))
        dequant_ms = cuda_ms(lambda: gpu._dequantize(layers[1], group, gpu._staging[0], gpu._weights))
        print(f"groups of {len(group)} experts ({len(gpu._groups)} per layer): host pinned: {gpu.host_pinned}, "
              f"VRAM {gpu.vram_bytes / 2**30:.2f} GiB; per group: copy {copy_ms:.2f} ms "
              f"({group_bytes / copy_ms / 1e6:.1f} GB/s host to device), dequantize {dequant_ms:.2f} ms "
              f"({3 * len(group) * d * info.intermediate_size / dequant_ms / 1e6:.0f} M values/ms)")
        for T in (int(t) for t in a.tokens.split(",")):
            g = torch.Generator(device="cuda").manual_seed(T)
            x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g)
            ids = torch.rand(T, e, device="cuda", generator=g).argsort(dim=1)[:, :a.top_k].to(torch.int32)
            w = torch.softmax(torch.randn(T, a.top_k, device="cuda", generator=g), dim=-1)
            matmul_ms = cuda_ms(lambda: gpu._fused_experts(x, *gpu._weights, w, ids, global_num_experts=e,
                                                           expert_map=gpu._expert_maps[0]))

            def one_pass():
                h = x
                for layer in layers:
                    h = gpu(layer, h, ids, w) * 0.5 + x * 0.5  # keep values finite; like a residual stream
            pass_ms = cuda_ms(one_pass)
            floor_ms = len(layers) * len(gpu._groups) * max(copy_ms, dequant_ms + matmul_ms)
            rows.append((parts, len(group), T, matmul_ms, pass_ms, floor_ms))
        torch.cuda.synchronize()
        gpu.close()
        del gpu
    print(f"\n{'parts':>6} {'group':>6} {'tokens':>7} {'matmuls ms/group':>17} {'pass ms':>9} {'floor ms':>9} "
          f"{'tok/s':>8} {'floor tok/s':>12}")
    for parts, group, T, matmul_ms, pass_ms, floor_ms in rows:
        print(f"{parts:6d} {group:6d} {T:7d} {matmul_ms:17.2f} {pass_ms:9.1f} {floor_ms:9.1f} "
              f"{T / pass_ms * 1e3:8.0f} {T / floor_ms * 1e3:12.0f}")


if __name__ == "__main__":
    main()
