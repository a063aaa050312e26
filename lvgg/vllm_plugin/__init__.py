"""lvgg's vLLM plugin: routed experts computed on the CPU by ggml, everything else by vLLM.

`register()` is the `vllm.general_plugins` entry point; vLLM calls it in every process. It
does nothing unless an experts file is configured (env LVGG_EXPERTS, set by `lvgg serve`
and `lvgg.LLM`), so installing lvgg never changes vLLM by itself. When active, every MoE
layer computes its routed experts with lvgg (`moe_method`) and vLLM's default model loader
is replaced by one that leaves them unread (`loader`).
"""
from __future__ import annotations

import os

EXPERTS_ENV = "LVGG_EXPERTS"
THREADS_ENV = "LVGG_CPU_THREADS"
GPU_PREFILL_ENV = "LVGG_GPU_PREFILL_MIN_TOKENS"  # passes of at least this many tokens stream experts to the GPU
GPU_RESIDENT_ENV = "LVGG_GPU_RESIDENT_LAYERS"  # layers whose experts live on the GPU: "0-5,40" or "auto"
GPU_EXPERTS_GB_ENV = "LVGG_GPU_EXPERTS_GB"  # the most VRAM (GiB) lvgg's experts may take
GPU_SPLIT_ENV = "LVGG_GPU_DECODE_SPLIT"  # decode steps: the GPU's share N (of top_k), "auto" or "off"

_registered = False


def register() -> None:
    global _registered
    if _registered or not os.environ.get(EXPERTS_ENV):
        return
    from lvgg.vllm_plugin.loader import register_loader
    from lvgg.vllm_plugin.moe_method import register_moe_method

    register_moe_method()
    register_loader()
    _registered = True

