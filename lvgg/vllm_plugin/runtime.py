"""The process-wide expert store and CPU engine the plugin's MoE layers share.

Opened at the first MoE layer vLLM builds, after checking that the experts file matches the
model (architecture, MoE layers, expert count, sizes); a mismatch stops startup with a
message naming the first difference.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from lvgg import _bridge
from lvgg.cuda_bridge import CudaExperts
from lvgg.experts import CpuMoE, ExpertStore
from lvgg.models import arch_for
from lvgg.vllm_plugin import EXPERTS_ENV, THREADS_ENV

_lock = threading.Lock()
_engine: CpuMoE | None = None
_cuda: CudaExperts | None = None


def check_experts_file(store: ExpertStore, hf_config: dict[str, Any]) -> None:
    """Raise ValueError naming the first difference between the experts file and the model."""
    model_type = hf_config.get("model_type", "?")
    spec = arch_for(model_type).spec(hf_config)
    file_arch = store.metadata().get("lvgg.architecture")
    if file_arch is not None and file_arch != model_type and arch_for(str(file_arch)).gguf_arch != \
            arch_for(model_type).gguf_arch:
        raise ValueError(f"experts file {store.path} was converted from a {file_arch} model; this model is "
                         f"{model_type}")
    if store.layers != spec.layers:
        missing = sorted(set(spec.layers) - set(store.layers))
        extra = sorted(set(store.layers) - set(spec.layers))
        raise ValueError(f"experts file {store.path} has MoE layers {store.layers}, the model has {spec.layers}"
                         + (f" (missing {missing})" if missing else "") + (f" (extra {extra})" if extra else ""))
    for layer in spec.layers:
        store.check_layer(layer, n_experts=spec.n_experts, hidden_size=spec.hidden_size,
                          intermediate_size=spec.intermediate_size)


def default_threads() -> int:
    """One per physical core; next to a GPU one core stays free for vLLM's own thread (30B-A3B
    Q4_K_M decode on the 16-core GPU machine: 37.7 tok/s with 15 threads, 35.6 with 16, 32.8
    with 14)."""
    import torch

    cores = len(_bridge.physical_core_cpus())
    return max(1, cores - 1) if torch.cuda.is_available() and cores > 2 else cores


def engine(hf_config: dict[str, Any], max_tokens: int) -> CpuMoE:
    """The engine of this process, created (and the file checked) on first use."""
    global _engine
    with _lock:
        if _engine is None:
            path = os.environ[EXPERTS_ENV]
            store = ExpertStore(path)
            check_experts_file(store, hf_config)
            spec = arch_for(hf_config["model_type"]).spec(hf_config)
            threads = int(os.environ.get(THREADS_ENV, "0") or 0) or default_threads()
            _engine = CpuMoE(store, threads=threads, max_tokens=max(max_tokens, 8192),
                             max_top_k=spec.top_k, activation="silu")
        return _engine


def cuda_experts(dtype) -> CudaExperts:
    """The engine behind CUDA tensors: pinned buffers made at the first call (outside any graph
    capture: vLLM's profiling run comes first)."""
    global _cuda
    with _lock:
        if _cuda is None:
            moe = current_engine()
            layer = moe.store.layer_info(moe.store.layers[0])
            _cuda = CudaExperts(moe, hidden_size=layer.hidden_size, top_k=moe.max_top_k,
                                max_tokens=moe.max_tokens, dtype=dtype)
        return _cuda


def current_engine() -> CpuMoE:
    if _engine is None:
        raise RuntimeError("lvgg's CPU MoE engine is not initialized: no MoE layer was built with the plugin")
    return _engine
