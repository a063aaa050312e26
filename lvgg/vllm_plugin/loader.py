"""The model loader the plugin puts in place of vLLM's default one: routed experts stay unread.

vLLM's expert-parallel weight filter skips, before reading them, the per-expert weight tensors
(`...experts.<id>.<proj>.weight`) whose id is not in the loader's `local_expert_ids`; an empty
set makes every routed expert remote, so vLLM reads only the dense weights. The few routed-expert
tensors that filter keeps (scales, zero points, AWQ/GPTQ `qweight`) are read but never reach the
model. Where vLLM has no such filter, every expert tensor is read and dropped.
"""
from __future__ import annotations

from lvgg.models import HF_ROUTED_EXPERT
from lvgg.vllm_plugin import compat
from lvgg.vllm_plugin.moe_method import LvggMoEMethod


class LvggModelLoader(compat.DefaultModelLoader):
    """vLLM's default loader, minus the routed experts (they come from lvgg's experts file)."""

    def _init_ep_weight_filter(self, *args, **kwargs) -> None:  # (model_config), or (model, model_config) in 0.34
        self.local_expert_ids = set()

    def get_all_weights(self, model_config, model):
        return ((name, t) for name, t in super().get_all_weights(model_config, model)
                if not HF_ROUTED_EXPERT.search(name))

    def load_weights(self, model, model_config) -> None:
        others = [m.layer_name for m in model.modules() if isinstance(m, compat.RoutedExperts)
                  and not isinstance(m.quant_method, LvggMoEMethod)]
        if others:  # their weights would stay uninitialized
            raise RuntimeError(f"lvgg: MoE layers {others} do not compute their experts with lvgg's method, but lvgg's "
                               "loader skips every routed expert; unset LVGG_EXPERTS to run this model in vLLM alone")
        super().load_weights(model, model_config)


def register_loader() -> None:
    """Use LvggModelLoader for every load format vLLM serves with its default loader."""
    if not compat.HAS_EXPERT_WEIGHT_FILTER:
        compat.init_logger("vllm.lvgg").warning(
            "lvgg: this vLLM's loader cannot skip expert tensors unread; the routed experts are read and dropped")
    for fmt, cls in list(compat.model_loaders.items()):
        if cls is compat.DefaultModelLoader:
            compat.model_loaders[fmt] = LvggModelLoader
