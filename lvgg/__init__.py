"""lvgg: Mixture-of-Experts LLMs too big for one GPU — vLLM on the GPU, routed experts on the CPU via ggml."""
from lvgg.experts import CpuMoE, ExpertLayerInfo, ExpertStore

__all__ = ["CpuMoE", "ExpertLayerInfo", "ExpertStore"]
__version__ = "0.1.0"
