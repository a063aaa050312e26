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
REPACK_ENV = "LVGG_REPACK"  # "off": the CPU computes from the file's own layout (no second copy)

# vLLM's Ray executor starts its workers with the Ray cluster's environment, not this process's,
# and copies to them only the variables whose names start with vLLM's prefixes or these.
RAY_PREFIXES_ENV = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"
SETTINGS_PREFIX = "LVGG_"

_registered = False


def copy_settings_to_ray_workers() -> None:
    """Have vLLM's Ray executor copy lvgg's settings (LVGG_*) to its workers, on this machine or others."""
    prefixes = [p.strip() for p in os.environ.get(RAY_PREFIXES_ENV, "").split(",") if p.strip()]
    if SETTINGS_PREFIX not in prefixes:
        os.environ[RAY_PREFIXES_ENV] = ",".join([*prefixes, SETTINGS_PREFIX])


def register() -> None:
    global _registered
    if _registered or not os.environ.get(EXPERTS_ENV):
        return
    copy_settings_to_ray_workers()
    from lvgg.vllm_plugin.loader import register_loader
    from lvgg.vllm_plugin.moe_method import register_moe_method

    register_moe_method()
    register_loader()
    _registered = True

