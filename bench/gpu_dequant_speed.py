"""Every expert type's GPU dequantization (lvgg's Triton kernels) against the link it follows.

A streamed prefill copies a layer's bytes over PCIe, then dequantizes them on the GPU: prefill
stays at the link's speed while dequantization reads bytes faster than the copy brings them. Per
type: one Qwen3-30B-A3B layer (128 experts, 3 x 2048 x 768 values; one expert quantized by ggml,
repeated), dequantized to bf16 on the GPU, its bytes per second next to the host-to-device copy
of the same bytes from pinned memory, measured in the same run.

    python bench/gpu_dequant_speed.py [--types Q4_K,IQ2_XXS,...]

Needs an NVIDIA GPU and Triton (not vLLM).
"""
from __future__ import annotations

import argparse

import gguf
import numpy as np
import torch

from lvgg.bench import cuda_ms
from lvgg.gpu.dequant import QUANT_BLOCKS, dequantize
from lvgg.quantize import quantize

E, D, F = 128, 2048, 768



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(QUANT_BLOCKS))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((3 * F, D)) / np.sqrt(D)).astype(np.float32)  # gate, up, down rows of one expert
    out = torch.empty(E, 3 * F, D, dtype=torch.bfloat16, device="cuda")
    print(f"{'type':>8} {'MiB/layer':>10} {'dequantize ms':>14} {'GB/s read':>10} {'copy ms':>8} {'link GB/s':>10}")
    for name in a.types.split(","):
        qtype = gguf.GGMLQuantizationType[name.upper()]
        one = quantize(values, qtype, threads=8, imatrix=np.ones(D, np.float32))  # IQ1_S, IQ2_XXS/XS need one
        host = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(one, (E, *one.shape))).reshape(-1)).pin_memory()
        raw = host.to("cuda")
        ms = cuda_ms(lambda: dequantize(raw, name, out))
        copy_ms = cuda_ms(lambda: raw.copy_(host, non_blocking=True))
        gb = raw.numel() / 1e9
        print(f"{name:>8} {raw.numel() / 2**20:10.0f} {ms:14.3f} {gb / ms * 1e3:10.0f} {copy_ms:8.2f} "
              f"{gb / copy_ms * 1e3:10.1f}")


if __name__ == "__main__":
    main()
