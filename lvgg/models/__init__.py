"""Architecture tables: one entry per MoE family, read by the converter, the plugin and tests.

Each entry maps the family's Hugging Face names (config keys, expert tensor names) to the
GGUF names llama.cpp uses, and says which layers are MoE. Shared experts are not in the
experts file: they stay with the dense weights on the GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

PROJECTIONS = ("gate", "up", "down")
# Routed-expert tensors in a GGUF file: layer number, projection (gate_up when fused).
GGUF_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight")
# Their biases (gpt-oss), f32.
GGUF_EXPERT_BIAS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.bias")
# A routed expert's tensor in a Hugging Face checkpoint of every family lvgg supports (shared
# experts are named `shared_expert(s).<proj>`, without an id), or a layer's experts as one tensor
# per projection (gpt-oss: experts.gate_up_proj, its _bias, _blocks and _scales, and down's;
# Step-3.5: moe.gate_proj.weight, up's and down's, beside its moe.share_expert).
HF_ROUTED_EXPERT = re.compile(r"\.experts\.(\d+\.|(gate_up|down)_proj(_bias|_blocks|_scales)?$)"
                              r"|\.moe\.(gate|up|down)_proj\.weight$")


def gguf_expert_name(layer: int, proj: str) -> str:
    """blk.N.ffn_{gate,up,down,gate_up}_exps.weight, as llama.cpp names routed experts."""
    return f"blk.{layer}.ffn_{proj}_exps.weight"


def gguf_expert_bias_name(layer: int, proj: str) -> str:
    """blk.N.ffn_{gate,up,down}_exps.bias, as llama.cpp names routed experts' biases (gpt-oss)."""
    return f"blk.{layer}.ffn_{proj}_exps.bias"


def _qwen_moe_layers(cfg: dict[str, Any], n: int) -> list[int]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def _first_k_dense_layers(cfg: dict[str, Any], n: int) -> list[int]:
    k = cfg.get("first_k_dense_replace", 0) or 0
    freq = cfg.get("moe_layer_freq", 1) or 1
    return [i for i in range(n) if i >= k and i % freq == 0]


def _ernie_moe_layers(cfg: dict[str, Any], n: int) -> list[int]:
    if cfg.get("use_moe") is False:
        return []
    start = cfg.get("moe_layer_start_index", 0) or 0
    end = cfg.get("moe_layer_end_index", -1)
    end = n - 1 if end is None or end < 0 else end  # -1 or absent: the last layer
    step = cfg.get("moe_layer_interval", 1) or 1
    return [i for i in range(n) if start <= i <= end and (i + 1) % step == 0]


def _step3p5_moe_layers(cfg: dict[str, Any], n: int) -> list[int]:
    """Step-3.5: the layers moe_layers_enum lists ("1,2,..."), else every layer but the first (vLLM's rule)."""
    listed = cfg.get("moe_layers_enum")
    return [int(i) for i in str(listed).split(",")] if listed is not None else list(range(1, n))


def _interleaved_moe_layers(cfg: dict[str, Any], n: int) -> list[int]:
    """Llama-4: every interleave_moe_layer_step-th layer (vLLM's rule)."""
    step = cfg.get("interleave_moe_layer_step", 1) or 1
    return [i for i in range(n) if (i + 1) % step == 0]


def _all_layers(cfg: dict[str, Any], n: int) -> list[int]:
    return list(range(n))


def _gemma4_moe_layers(cfg: dict[str, Any], n: int) -> list[int]:
    """gemma-4: every layer has a MoE block beside its dense MLP, or none has."""
    return _all_layers(cfg, n) if cfg.get("enable_moe_block") else []


def _nemotron_h_moe_layers(cfg: dict[str, Any], n: int) -> list[int]:
    """Nemotron-H: the layers whose block is MoE ("E" in hybrid_override_pattern, as the Hub's
    configs say; "moe" in layers_block_type, as transformers saves them)."""
    return [i for i, kind in enumerate(_layer_kinds(cfg)) if kind in ("E", "moe")]


def _layer_kinds(cfg: dict[str, Any]) -> list[str]:
    """A hybrid model's block kind per layer (Nemotron-H's pattern)."""
    return list(cfg.get("hybrid_override_pattern") or cfg.get("layers_block_type") or [])


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config.json: the config itself, or the ``text_config`` of a
    multimodal checkpoint (Qwen3.5, Qwen3-VL, Llama-4, gemma-4, Kimi-K2.5), whose experts sit in
    its text model."""
    text = config.get("text_config")
    return text if isinstance(text, dict) and text.get("model_type") else config


@dataclass(frozen=True)
class MoEArch:
    model_type: str  # config.json "model_type"
    gguf_arch: str  # general.architecture as llama.cpp names it
    moe_block: str  # module holding the experts: model.layers.N.<moe_block>.experts.E.<proj>.weight ("": none)
    hf_proj: dict[str, str]  # gate/up/down (up/down where not gated) -> HF projection name
    n_experts_keys: tuple[str, ...]  # config keys naming the routed expert count (first present wins)
    moe_ff_key: str  # expert intermediate size
    moe_layers: Callable[[dict[str, Any], int], list[int]]  # (config, the model's layer count) -> MoE layers
    shared_expert: str | None = None  # module name of shared experts (kept on the GPU)
    top_k_key: str = "num_experts_per_tok"
    # config keys naming the width the experts take and give (first present wins): Nemotron-3-Super's
    # latent MoE runs its experts in a latent space narrower than the hidden size
    expert_dim_keys: tuple[str, ...] = ("hidden_size",)
    n_layers_key: str = "num_hidden_layers"  # the model's layer count
    # config key of the count of next-token-prediction (MTP) layers, numbered after the model's own
    # (model.layers.<n_layers + k>, as DeepSeek-V3 and GLM ship them; llama.cpp's blk.<n_layers + k>)
    mtp_key: str | None = None
    # where the MTP layers are a module of their own: <mtp_prefix>layers.<k> (Qwen3-Next, Qwen3.5),
    # one of them where config.json does not say (vLLM's default)
    mtp_prefix: str | None = None
    # why vLLM runs this family on GPUs only (its CPU build refuses or lacks a kernel), if it does
    gpu_only: str | None = None
    grouped_routing: bool = False  # DeepSeek-style group-limited top-k (done by vLLM)
    # Every projection of every expert has a bias (gpt-oss), kept in the experts file beside the weights.
    biased: bool = False
    # Experts with gate, up and down; False: up and down only, relu² between (Nemotron-H).
    gated: bool = True
    # Where a checkpoint holds each layer's experts as one tensor per projection (gate_up_proj and
    # down_proj, or their MXFP4 blocks) rather than one per expert: gate's and up's rows
    # "interleaved" (gpt-oss) or as "halves" (gate's first: Llama-4, gemma-4, Qwen3.5, Qwen3-VL).
    fused_gate_up: str = "halves"
    # A checkpoint may hold each layer's experts as one [E, out, in] tensor per projection beside the
    # block's other modules (<moe_block>.gate_proj.weight: Step-3.5) rather than one per expert.
    stacked: bool = False
    # Where the checkpoint's layers are: model.layers.N (a causal LM's); a multimodal checkpoint's
    # text model has its own (found in the checkpoint by the converter).
    hf_prefix: str = "model."
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def projections(self) -> tuple[str, ...]:
        return PROJECTIONS if self.gated else ("up", "down")

    def _experts(self, layer: int, prefix: str | None) -> str:
        block = f"{self.moe_block}." if self.moe_block else ""
        return f"{self.hf_prefix if prefix is None else prefix}layers.{layer}.{block}experts"

    def hf_expert_name(self, layer: int, expert: int, proj: str, prefix: str | None = None) -> str:
        return f"{self._experts(layer, prefix)}.{expert}.{self.hf_proj[proj]}.weight"

    def hf_stacked_name(self, layer: int, proj: str, prefix: str | None = None) -> str:
        """A stacked checkpoint's tensor of one projection of a layer's experts ([E, out, in])."""
        return f"{self.hf_prefix if prefix is None else prefix}layers.{layer}.{self.moe_block}.{self.hf_proj[proj]}.weight"

    def hf_fused_name(self, layer: int, proj: str, prefix: str | None = None) -> str:
        """A fused checkpoint's tensor of a layer: proj is gate_up or down, with a suffix where
        it has one (_bias, _blocks, _scales)."""
        return f"{self._experts(layer, prefix)}.{proj}_proj"

    def experts_marker(self, layer: int) -> str:
        """What follows the prefix in the names of a layer's expert tensors."""
        return self._experts(layer, "")

    def spec(self, cfg: dict[str, Any]) -> "ExpertSpec":
        n_experts = next((cfg[k] for k in self.n_experts_keys if cfg.get(k) is not None), None)
        n_layers = cfg.get(self.n_layers_key)
        if n_layers is None and _layer_kinds(cfg):  # transformers saves Nemotron-H's pattern alone
            n_layers = len(_layer_kinds(cfg))
        dim = next((cfg[k] for k in self.expert_dim_keys if cfg.get(k) is not None), None)
        missing = [k for k in (self.moe_ff_key, self.top_k_key) if cfg.get(k) is None] + \
            ([self.n_layers_key] if n_layers is None else []) + \
            [" or ".join(keys) for keys, found in ((self.n_experts_keys, n_experts), (self.expert_dim_keys, dim))
             if found is None]
        if missing:
            raise ValueError(f"config.json of a {self.model_type} model lacks {missing}")
        n_mtp = int(cfg.get(self.mtp_key, 1 if self.mtp_prefix else 0) or 0) if self.mtp_key else 0
        return ExpertSpec(arch=self, n_layers=int(n_layers), layers=self.moe_layers(cfg, int(n_layers)),
                          mtp_layers=list(range(int(n_layers), int(n_layers) + n_mtp)),
                          n_experts=int(n_experts),
                          hidden_size=int(dim), intermediate_size=int(cfg[self.moe_ff_key]),
                          top_k=int(cfg[self.top_k_key]),
                          activation=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
                          clamped_layers=tuple(i for i, limit in enumerate(cfg.get("swiglu_limits") or [])
                                               if limit not in (None, 0)))


@dataclass(frozen=True)
class ExpertSpec:
    """The routed experts one model has: what an experts file for it must hold."""

    arch: MoEArch
    n_layers: int  # of the model, MoE or not
    layers: list[int]  # the MoE ones
    mtp_layers: list[int]  # its next-token-prediction layers' (MoE), which vLLM runs as an MTP draft model
    n_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    activation: str  # config.json's hidden_act
    clamped_layers: tuple[int, ...] = ()  # layers whose SwiGLU is clamped (Step-3.5's swiglu_limits)

    def engine_activation(self, layer: int) -> str:
        """The activation lvgg's engine computes for ``layer``'s experts (as vLLM's MoE layer says
        it, which the plugin takes at startup)."""
        if not self.arch.gated:
            return "relu2"
        if self.arch.biased:
            return "swigluoai"
        if layer in self.clamped_layers:
            return "swiglustep"
        return "gelu" if self.activation.startswith("gelu") else "silu"

    def file_layer(self, module_name: str, index: int) -> int:
        """The experts file's layer (blk.<i>) of vLLM's MoE layer ``module_name`` (numbered ``index``
        in its module): an MTP module's own layer k (``mtp.layers.k``: Qwen3-Next, Qwen3.5) comes
        after the model's layers, as the converter writes it; DeepSeek's and GLM's MTP layers are
        numbered so already."""
        prefix = self.arch.mtp_prefix
        return self.n_layers + index if prefix and f".{prefix}layers." in f".{module_name}" else index

    def checkpoint_layer(self, layer: int, prefix: str) -> tuple[str, int]:
        """Where a checkpoint whose layers are ``<prefix>layers.<i>`` keeps the experts of the file's
        ``layer``: (prefix, index), an MTP module's layers under its own prefix (file_layer's inverse)."""
        if self.arch.mtp_prefix and layer >= self.n_layers:
            return self.arch.mtp_prefix, layer - self.n_layers
        return prefix, layer

    def hf_shape(self, proj: str) -> tuple[int, int]:
        """[out, in] of one expert's projection in the HF checkpoint."""
        d, f = self.hidden_size, self.intermediate_size
        return (d, f) if proj == "down" else (f, d)


_GATE_UP_DOWN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_W1_W3_W2 = {"gate": "w1", "up": "w3", "down": "w2"}
_QWEN_EXPERTS = ("num_experts", "num_local_experts")  # transformers 5 saves the latter
_NEXTN = "num_nextn_predict_layers"

ARCHITECTURES: dict[str, MoEArch] = {a.model_type: a for a in [
    MoEArch("qwen3_moe", "qwen3moe", "mlp", _GATE_UP_DOWN, _QWEN_EXPERTS, "moe_intermediate_size", _qwen_moe_layers),
    MoEArch("qwen2_moe", "qwen2moe", "mlp", _GATE_UP_DOWN, _QWEN_EXPERTS, "moe_intermediate_size", _qwen_moe_layers,
            shared_expert="shared_expert"),
    MoEArch("qwen3_next", "qwen3next", "mlp", _GATE_UP_DOWN, _QWEN_EXPERTS, "moe_intermediate_size",
            _qwen_moe_layers, shared_expert="shared_expert", mtp_key=_NEXTN, mtp_prefix="mtp."),
    MoEArch("mixtral", "llama", "block_sparse_moe", _W1_W3_W2, ("num_local_experts",), "intermediate_size", _all_layers),
    MoEArch("minimax_m2", "minimax-m2", "block_sparse_moe", _W1_W3_W2, ("num_local_experts",), "intermediate_size",
            _all_layers),
    MoEArch("deepseek_v2", "deepseek2", "mlp", _GATE_UP_DOWN, ("n_routed_experts",), "moe_intermediate_size",
            _first_k_dense_layers, shared_expert="shared_experts", grouped_routing=True),
    MoEArch("deepseek_v3", "deepseek2", "mlp", _GATE_UP_DOWN, ("n_routed_experts",), "moe_intermediate_size",
            _first_k_dense_layers, shared_expert="shared_experts", grouped_routing=True, mtp_key=_NEXTN),
    MoEArch("kimi_k2", "deepseek2", "mlp", _GATE_UP_DOWN, ("n_routed_experts",), "moe_intermediate_size",
            _first_k_dense_layers, shared_expert="shared_experts", grouped_routing=True, mtp_key=_NEXTN),
    MoEArch("glm4_moe", "glm4moe", "mlp", _GATE_UP_DOWN, ("n_routed_experts",), "moe_intermediate_size",
            _first_k_dense_layers, shared_expert="shared_experts", grouped_routing=True, mtp_key=_NEXTN),
    MoEArch("glm4_moe_lite", "deepseek2", "mlp", _GATE_UP_DOWN, ("n_routed_experts",), "moe_intermediate_size",
            _first_k_dense_layers, shared_expert="shared_experts", grouped_routing=True,
            mtp_key=_NEXTN),  # GLM-4.7-Flash
    MoEArch("ernie4_5_moe", "ernie4_5-moe", "mlp", _GATE_UP_DOWN, ("moe_num_experts",), "moe_intermediate_size",
            _ernie_moe_layers, shared_expert="shared_experts", top_k_key="moe_k"),
    # Ling/Ring (inclusionAI): checkpoints with remote code (vLLM needs trust_remote_code)
    MoEArch("bailing_moe", "bailingmoe", "mlp", _GATE_UP_DOWN, ("num_experts",), "moe_intermediate_size",
            _first_k_dense_layers, shared_expert="shared_experts"),
    MoEArch("bailing_moe_v2", "bailingmoe2", "mlp", _GATE_UP_DOWN, ("num_experts",), "moe_intermediate_size",
            _first_k_dense_layers, shared_expert="shared_experts", grouped_routing=True),
    MoEArch("gpt_oss", "gpt-oss", "mlp", {}, ("num_local_experts",), "intermediate_size", _all_layers, biased=True,
            fused_gate_up="interleaved"),
    # Llama-4's text model (vLLM applies its top-1 router weight to the input)
    MoEArch("llama4_text", "llama4", "feed_forward", {}, ("num_local_experts",), "intermediate_size",
            _interleaved_moe_layers, shared_expert="shared_expert"),
    # The text models of multimodal checkpoints (config.json's text_config)
    MoEArch("qwen3_5_moe_text", "qwen35moe", "mlp", _GATE_UP_DOWN, _QWEN_EXPERTS, "moe_intermediate_size",
            _qwen_moe_layers, shared_expert="shared_expert", mtp_key="mtp_num_hidden_layers",
            mtp_prefix="mtp."),  # Qwen3.5 / Qwen3.6
    MoEArch("qwen3_vl_moe_text", "qwen3vlmoe", "mlp", _GATE_UP_DOWN, _QWEN_EXPERTS, "moe_intermediate_size",
            _qwen_moe_layers),
    # gemma-4: the experts sit in the layer beside its dense MLP (layers.N.experts), GELU (tanh)
    MoEArch("gemma4_text", "gemma4", "", _GATE_UP_DOWN, ("num_experts",), "moe_intermediate_size",
            _gemma4_moe_layers, top_k_key="top_k_experts"),
    # Nemotron-3 (hybrid Mamba-2): experts of up and down with relu² between
    MoEArch("nemotron_h", "nemotron_h_moe", "mixer", {"up": "up_proj", "down": "down_proj"}, ("n_routed_experts",),
            "moe_intermediate_size", _nemotron_h_moe_layers, shared_expert="shared_experts", grouped_routing=True,
            expert_dim_keys=("moe_latent_size", "hidden_size"), gated=False, hf_prefix="backbone.",
            gpu_only="vLLM runs experts without a gate (is_act_and_mul=False) in its CUDA, ROCm and XPU builds only"),
    # LongCat-Flash: zero-computation (identity) experts beside the routed ones, which vLLM's router
    # computes and hands over as expert 0 with weight 0
    # Step-3.5: some layers clamp their SwiGLU (swiglu_limits: vLLM's swiglustep, which the plugin
    # takes from vLLM's layers); experts stacked per projection in the released checkpoint
    MoEArch("step3p5", "step35", "moe", _GATE_UP_DOWN, ("moe_num_experts",), "moe_intermediate_size",
            _step3p5_moe_layers, shared_expert="share_expert", top_k_key="moe_top_k", stacked=True),
    MoEArch("longcat_flash", "longcat-flash", "mlp", _GATE_UP_DOWN, ("n_routed_experts",), "expert_ffn_hidden_size",
            _all_layers, top_k_key="moe_topk", n_layers_key="num_layers",
            gpu_only="vLLM's router computes its zero-computation experts with a Triton kernel (GPU builds only)"),
]}


def gguf_arch_of(name: str) -> str:
    """llama.cpp's architecture name (GGUF's general.architecture) of a family named either way:
    by its Hugging Face model_type or by llama.cpp's name (several HF families may share one)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name].gguf_arch
    if name in {a.gguf_arch for a in ARCHITECTURES.values()}:
        return name
    raise ValueError(f"unsupported architecture {name!r}: lvgg knows the MoE families "
                     + ", ".join(f"{a.model_type} ({a.gguf_arch})" for a in ARCHITECTURES.values()))


def same_family(name: str, model_type: str) -> bool:
    """An experts file whose architecture is ``name`` (either naming) suits a ``model_type`` model."""
    try:
        return gguf_arch_of(name) == gguf_arch_of(model_type)
    except ValueError:
        return False


def arch_for(model_type: str) -> MoEArch:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(f"unsupported architecture {model_type!r}: lvgg knows the MoE families "
                         f"{', '.join(sorted(ARCHITECTURES))}") from None


def model_spec(config: dict[str, Any]) -> ExpertSpec:
    """The routed experts of a model, from its config.json (a multimodal one's text model's)."""
    text = text_config(config)
    return arch_for(text.get("model_type", "?")).spec(text)


def check_experts_match(path: str, metadata: dict[str, Any], layer_dims: dict[int, tuple[int, int, int, bool]],
                        hf_config: dict[str, Any], layers: list[int] | None = None) -> None:
    """Raise ValueError naming the first difference between an experts file and a model: the
    file's ``metadata`` (its architecture, either naming), its MoE layers and their
    ``layer_dims`` (routed experts, hidden size, expert intermediate size, biases or not), against
    the model's config.json (its MoE ``layers`` only, e.g. a pipeline-parallel rank's; default: all)."""
    hf_config = text_config(hf_config)
    model_type = hf_config.get("model_type", "?")
    arch = arch_for(model_type)
    spec = arch.spec(hf_config)
    for key in ("general.architecture", "lvgg.architecture"):  # llama.cpp's name, and lvgg convert's source
        file_arch = metadata.get(key)
        if file_arch is not None and not same_family(str(file_arch), model_type):
            raise ValueError(f"experts file {path} holds a {file_arch} model's experts ({key}); this model is "
                             f"{model_type} ({arch.gguf_arch} in llama.cpp's names)")
    if not layer_dims:
        raise ValueError(f"{path} holds no routed-expert tensors (blk.N.ffn_{{gate,up,down}}_exps.weight): "
                         "give a MoE model's GGUF or an experts file made by `lvgg convert`")
    want = spec.layers if layers is None else layers  # ``layers`` may name next-token-prediction ones
    # blk.N past the model's layers: the next-token-prediction (MTP) layers llama.cpp's GGUFs of GLM
    # and DeepSeek models carry (and lvgg convert writes), which vLLM runs only as a draft model
    have = sorted(n for n in layer_dims if n < spec.n_layers)
    missing = sorted(set(want) - set(layer_dims))
    extra = sorted(set(have) - set(want)) if layers is None else []
    if missing or extra:
        raise ValueError(f"experts file {path} has MoE layers {have}, the model has {want}"
                         + (f" (missing {missing})" if missing else "") + (f" (extra {extra})" if extra else ""))
    expected = (spec.n_experts, spec.hidden_size, spec.intermediate_size)
    for layer in want:
        for name, found, wanted in zip(("n_experts", "hidden_size", "intermediate_size"), layer_dims[layer], expected):
            if found != wanted:
                raise ValueError(f"{path}: layer {layer} has {name}={found}, the model expects {wanted}; "
                                 "this experts file was made for another model")
        if bool(layer_dims[layer][3]) != arch.biased:
            raise ValueError(f"{path}: layer {layer}'s experts have {'biases' if layer_dims[layer][3] else 'no biases'}"
                             f", a {model_type} model's have {'biases' if arch.biased else 'none'} "
                             "(blk.N.ffn_{gate,up,down}_exps.bias); this experts file was made for another model")
