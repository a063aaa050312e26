"""The vLLM names lvgg depends on, in one place (vLLM 0.26 to 0.33 share these)."""
from __future__ import annotations

from vllm.config import get_current_vllm_config  # noqa: F401
from vllm.model_executor.custom_op import op_registry_oot  # noqa: F401
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (  # noqa: F401
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.models.utils import extract_layer_index  # noqa: F401
