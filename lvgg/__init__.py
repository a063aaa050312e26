"""lvgg: Mixture-of-Experts LLMs too big for one GPU — vLLM on the GPU, routed experts on the CPU via ggml."""
import torch  # noqa: F401  (first: ggml then shares torch's OpenMP runtime and threads)

# The classes load the compiled bridge on first use, so that `import lvgg` (and `lvgg doctor`)
# works on a machine where the bridge does not load, and can say why.
_LAZY = {"CpuMoE": "lvgg.experts", "EngineNode": "lvgg.experts", "ExpertLayerInfo": "lvgg.experts",
         "ExpertStore": "lvgg.experts", "CudaExperts": "lvgg.gpu.bridge"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lvgg' has no attribute {name!r}")


def LLM(*args, **kwargs):  # noqa: N802 - mirrors vllm.LLM
    """vLLM's `LLM` with the routed experts on the CPU: lvgg.LLM(model, experts=FILE, **vllm_kwargs)."""
    from lvgg.llm import LLM as _LLM

    return _LLM(*args, **kwargs)


__all__ = ["CpuMoE", "CudaExperts", "EngineNode", "ExpertLayerInfo", "ExpertStore", "LLM"]
__version__ = "0.1.0"
