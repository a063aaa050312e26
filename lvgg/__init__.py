"""lvgg: Mixture-of-Experts LLMs too big for one GPU — vLLM on the GPU, routed experts on the CPU via ggml."""
import torch  # noqa: F401  (first: ggml then shares torch's OpenMP runtime and threads)

from lvgg.cuda_bridge import CudaExperts
from lvgg.experts import CpuMoE, EngineNode, ExpertLayerInfo, ExpertStore


def LLM(*args, **kwargs):  # noqa: N802 - mirrors vllm.LLM
    """vLLM's `LLM` with the routed experts on the CPU: lvgg.LLM(model, experts=FILE, **vllm_kwargs)."""
    from lvgg.llm import LLM as _LLM

    return _LLM(*args, **kwargs)


__all__ = ["CpuMoE", "CudaExperts", "EngineNode", "ExpertLayerInfo", "ExpertStore", "LLM"]
__version__ = "0.1.0"
