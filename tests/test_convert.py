"""lvgg convert: architecture tables, HF -> experts file round trips, --from-gguf, bad input."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import lvgg
from lvgg.convert.gguf_to_gguf import convert_gguf
from lvgg.convert.hf_to_gguf import convert_hf
from lvgg.convert.output_types import projection_types
from lvgg.cli import app
from lvgg.models import ARCHITECTURES, PROJECTIONS, arch_for, gguf_expert_name, model_spec
from lvgg.testing import llama_cpp
from lvgg.testing.expert_files import write_llamacpp_gguf
from lvgg.llm import check_before_start
from lvgg.testing.tiny_models import FAMILY_CONFIGS, MULTIMODAL_TEXT, make_tiny_model, make_tiny_multimodal

# Against transformers' block on the original weights: weight quantization (Q4_K ~7% on
# Gaussian weights) plus ggml's activation quantization.
TOLERANCE = {Q.F32: 1e-5, Q.BF16: 1e-2, Q.Q8_0: 3e-2, Q.Q4_K: 0.2}
# Relative error of the file's weights (dequantized by gguf-py) against the checkpoint's.
WEIGHT_ERROR = {Q.F32: 0.0, Q.BF16: 4e-3, Q.Q8_0: 8e-3, Q.Q4_K: 9e-2}


def all_types(qtype):
    return {p: qtype for p in PROJECTIONS}


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family_model(request, tmp_path_factory):
    folder = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=3, dtype="float32")
    return request.param, folder


# The experts' activation by family, as the engine names it (default: silu).
ACTIVATION = {"gpt_oss": "swigluoai", "gemma4_text": "gelu", "nemotron_h": "relu2"}
# ggml's CPU GELU rounds its input to fp16 and reads a table (llama.cpp's numerics too): ~3e-4
# of relative error where the weights add none.
GELU_TOLERANCE = 2e-3


def checkpoint_experts(f, arch, layer, proj, prefix=None, hidden=256):
    """[experts, rows, cols] of one projection of a layer, from any checkpoint layout: one tensor
    per expert, or fused gate_up and down ([E, out, in], or [E, in, out] where gate_up's second
    dimension is the hidden size)."""
    fused_name = arch.hf_fused_name(layer, "down" if proj == "down" else "gate_up", prefix)
    if fused_name not in f.keys():
        return np.stack([f.get_tensor(arch.hf_expert_name(layer, e, proj, prefix)).numpy() for e in range(8)])
    gate_up = f.get_slice(arch.hf_fused_name(layer, "gate_up", prefix)).get_shape()
    fused = f.get_tensor(fused_name).numpy()
    if gate_up[1] == hidden:  # [E, in, out]
        fused = fused.transpose(0, 2, 1)
    if proj != "down":
        half = fused.shape[1] // 2
        fused = fused[:, {"gate": 0, "up": 1}[proj]::2] if arch.fused_gate_up == "interleaved" else \
            fused[:, :half] if proj == "gate" else fused[:, half:]
    return fused


def test_table_names_every_expert_tensor_of_the_checkpoint(family_model):
    family, folder = family_model
    config = json.loads((folder / "config.json").read_text())
    arch = arch_for(config["model_type"])
    spec = arch.spec(config)
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # (transformers' LongCat also saves weights for its zero-computation experts, past the routed ones)
    expert_keys = {k for k in keys if ".experts." in k
                   and int((re.search(r"\.experts\.(\d+)\.", k) or [0, 0])[1]) < spec.n_experts}
    if arch.hf_fused_name(spec.layers[0], "down") in keys:
        wanted = {arch.hf_fused_name(layer, p) + suffix for layer in spec.layers for p in ("gate_up", "down")
                  for suffix in (("", "_bias") if arch.biased else ("",))}
    else:
        wanted = {arch.hf_expert_name(layer, e, p) for layer in spec.layers for e in range(spec.n_experts)
                  for p in arch.projections}
    assert wanted == expert_keys
    top_k = FAMILY_CONFIGS[family].get("num_experts_per_tok", FAMILY_CONFIGS[family].get("top_k_experts", 2))
    assert spec.n_experts == 8 and spec.top_k == top_k
    if arch.shared_expert:
        assert any(f".{arch.shared_expert}." in k for k in keys)


def expected_experts_output(family, experts, x, ids, w):
    """transformers' experts module of a layer on tokens x routed to ids with weights w."""
    with torch.no_grad():
        if family == "llama4_text":  # its experts module takes every expert's rows, [E * rows, D]
            n = x.shape[0]
            each = experts(x.repeat(8, 1)).view(8, n, x.shape[1])  # each expert on every token
            return sum(w[:, k, None] * each[ids[:, k], torch.arange(n)] for k in range(ids.shape[1])).double().numpy()
        return experts(x, ids, w).double().numpy()


def check_against_transformers(family, model, store, activation, tolerance):
    """The experts file's layers, computed by lvgg's engine, against the model's experts modules."""
    moe = lvgg.CpuMoE(store, threads=2, activation=activation)
    tolerance = max(tolerance, GELU_TOLERANCE) if activation == "gelu" else tolerance
    blocks = {int(m.group(1)): module for name, module in model.named_modules()
              if (m := re.search(r"layers\.(\d+)\.(?:\w+\.)?experts$", name))}
    assert sorted(blocks) == store.layers
    rng = np.random.default_rng(0)
    for layer, experts in blocks.items():
        x = torch.from_numpy(rng.standard_normal((9, 256)).astype(np.float32))
        ids = torch.from_numpy(np.stack([rng.choice(8, 2, replace=False) for _ in range(9)]))
        w = torch.from_numpy(rng.random((9, 2)).astype(np.float32))
        expected = expected_experts_output(family, experts, x, ids, w)
        got = moe(layer, x, ids, w).double().numpy()
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tolerance, (family, layer)


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_round_trip_matches_transformers_moe_block(family_model, qtype, tmp_path):
    from transformers import AutoModelForCausalLM

    family, folder = family_model
    out = convert_hf(str(folder), tmp_path / "experts.gguf", all_types(qtype), threads=2, quiet=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    check_against_transformers(family, model, lvgg.ExpertStore(out), ACTIVATION.get(family, "silu"), TOLERANCE[qtype])


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_converted_weights_match_the_checkpoint(family_model, qtype, tmp_path):
    family, folder = family_model
    config = json.loads((folder / "config.json").read_text())
    arch = arch_for(config["model_type"])
    out = convert_hf(str(folder), tmp_path / "e.gguf", all_types(qtype), threads=2, quiet=True)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for layer in arch.spec(config).layers:
            for proj in arch.projections:
                t = tensors[gguf_expert_name(layer, proj)]
                got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(8, *t.data.shape[1:2], -1)
                want = checkpoint_experts(f, arch, layer, proj)
                assert got.shape == want.shape
                err = np.linalg.norm(got - want) / np.linalg.norm(want)
                assert err <= WEIGHT_ERROR[qtype], (layer, proj, err)


def test_metadata_names_source_architecture_and_types(family_model, tmp_path):
    family, folder = family_model
    types = projection_types("Q4_K", "down=Q6_K")
    out = convert_hf(str(folder), tmp_path / "e.gguf", types, threads=1, quiet=True)
    meta = lvgg.ExpertStore(out).metadata()
    arch = ARCHITECTURES[family]
    assert meta["general.architecture"] == arch.gguf_arch
    assert meta["lvgg.architecture"] == family
    assert meta["lvgg.source_model"] == str(folder)
    assert meta["lvgg.source_revision"].startswith("sha256:")
    assert meta[f"{arch.gguf_arch}.expert_count"] == 8
    info = lvgg.ExpertStore(out).layer_info(lvgg.ExpertStore(out).layers[0])
    assert info.types == {p: "q6_K" if p == "down" else "q4_K" for p in arch.projections}


# --- multimodal checkpoints: the experts of their text model ------------------------------

def as_the_hub_ships_it(folder, model_type):
    """Rewrite a checkpoint's experts as the Hub's files hold them where transformers saves them
    otherwise: Qwen3.5's as one gate_up [E, 2F, D] and one down [E, D, F] per layer (transformers
    saves a tensor per expert), Qwen3-VL's fused tensors as [E, in, out] (transformers: [E, out, in])."""
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if model_type == "qwen3_5_moe":
        per_expert = re.compile(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
        layers = {}
        for name in list(tensors):
            if m := per_expert.match(name):
                layers.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = tensors.pop(name)
        for base, projections in layers.items():
            stacked = {p: torch.stack([w[e] for e in sorted(w)]) for p, w in projections.items()}
            tensors[base + ".gate_up_proj"] = torch.cat([stacked["gate"], stacked["up"]], dim=1)
            tensors[base + ".down_proj"] = stacked["down"]
    else:
        for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def multimodal_models(tmp_path_factory):
    made = {}

    def model(model_type):
        if model_type not in made:
            made[model_type] = make_tiny_multimodal(model_type, tmp_path_factory.mktemp(model_type), seed=5)
        return made[model_type]
    return model


@pytest.mark.parametrize("model_type,hub", [("gemma4", False), ("llama4", False), ("qwen3_5_moe", False),
                                            ("qwen3_5_moe", True), ("qwen3_vl_moe", False), ("qwen3_vl_moe", True)],
                         ids=lambda v: {False: "as-saved", True: "as-the-Hub-ships-it"}.get(v, v))
def test_multimodal_checkpoint_gives_its_text_models_experts(multimodal_models, model_type, hub, tmp_path):
    from transformers import AutoModelForImageTextToText

    folder = shutil.copytree(multimodal_models(model_type), tmp_path / model_type)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    if hub:
        as_the_hub_ships_it(folder, model_type)
    out = convert_hf(str(folder), tmp_path / "e.gguf", all_types(Q.F32), threads=2, quiet=True)
    store = lvgg.ExpertStore(out)
    text = MULTIMODAL_TEXT[model_type]
    assert store.metadata()["lvgg.architecture"] == text
    assert store.metadata()["general.architecture"] == ARCHITECTURES[text].gguf_arch
    check_before_start(str(folder), [out])  # what serve checks: the text model's config against the file
    check_against_transformers(text, model, store, ACTIVATION.get(text, "silu"), TOLERANCE[Q.F32])


def test_latent_moe_experts_take_the_latent_width(tmp_path):
    """Nemotron-3-Super's latent MoE: its experts run in moe_latent_size (projections into and out
    of it stay with vLLM's dense weights); the file's experts are that wide."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model("nemotron_h", tmp_path / "latent", seed=8, dtype="float32", moe_latent_size=512)
    out = convert_hf(str(folder), tmp_path / "e.gguf", all_types(Q.F32), threads=2, quiet=True)
    store = lvgg.ExpertStore(out)
    assert [(info.hidden_size, info.intermediate_size) for info in map(store.layer_info, store.layers)] == \
        [(512, 256)] * 2
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    moe = lvgg.CpuMoE(store, threads=2, activation="relu2")
    experts = dict(model.named_modules())["model.layers.1.mixer.experts"]  # (saved as backbone.layers)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((5, 512)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.choice(8, 2, replace=False) for _ in range(5)]))
    w = torch.from_numpy(rng.random((5, 2)).astype(np.float32))
    expected = expected_experts_output("nemotron_h", experts, x, ids, w)
    assert np.linalg.norm(moe(1, x, ids, w).double().numpy() - expected) / np.linalg.norm(expected) < 1e-5


@pytest.mark.parametrize("family,names", [("glm4_moe_lite", "model.layers.3"), ("qwen3_next", "mtp.layers.0")])
def test_next_token_prediction_layers_experts_are_written_after_the_models_layers(family, names, tmp_path):
    """The checkpoint's MTP layer (DeepSeek-V3/GLM: model.layers.<n>; Qwen3-Next/Qwen3.5: a module of
    its own, mtp.layers.0) becomes the file's blk.<n>, as llama.cpp numbers it; a checkpoint without
    its experts gives a file without that layer."""
    folder = make_tiny_model(family, tmp_path / family, seed=7, dtype="float32", nextn=1)
    arch = ARCHITECTURES[family]
    # the plugin's numbering of vLLM's MTP layer (model.layers.3, or the MTP module's own layers.0)
    # is the file's, and the converter's way back finds it in the checkpoint
    spec = model_spec(json.loads((folder / "config.json").read_text()))
    assert spec.file_layer(f"{names}.mlp.experts", int(names[-1])) == 3
    assert spec.checkpoint_layer(3, "model.") == (names[:-1].removesuffix("layers."), int(names[-1]))
    assert spec.file_layer("model.layers.2.mlp.experts", 2) == 2 and spec.checkpoint_layer(2, "model.") == ("model.", 2)
    out = convert_hf(str(folder), tmp_path / "e.gguf", all_types(Q.F32), threads=2, quiet=True)
    store = lvgg.ExpertStore(out)
    assert store.layers[-1] == 3 and store.metadata()[f"{arch.gguf_arch}.nextn_predict_layers"] == 1
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for proj in arch.projections:
            want = np.stack([f.get_tensor(f"{names}.mlp.experts.{e}.{proj}_proj.weight").numpy() for e in range(8)])
            np.testing.assert_array_equal(tensors[f"blk.3.ffn_{proj}_exps.weight"], want)
        kept = {k: f.get_tensor(k) for k in f.keys() if f"{names}.mlp.experts." not in k}
    save_file(kept, str(folder / "model.safetensors"))
    without = convert_hf(str(folder), tmp_path / "without.gguf", all_types(Q.F32), threads=2, quiet=True)
    assert 3 not in lvgg.ExpertStore(without).layers
    assert "nextn_predict_layers" not in str(lvgg.ExpertStore(without).metadata())


def test_kimi_k25_checkpoint_gives_its_deepseek_text_models_experts(tmp_path):
    """Kimi-K2.5 as the Hub ships it: config.json's text_config is a kimi_k2 (DeepSeek-V3) model,
    whose tensors are under language_model.model.layers (transformers has no Kimi-K2.5 model class
    to save one: the DeepSeek-V3 checkpoint is rewritten so)."""
    folder = make_tiny_model("deepseek_v3", tmp_path / "deepseek_v3", seed=6, dtype="float32")
    text = json.loads((folder / "config.json").read_text())
    plain = convert_hf(str(folder), tmp_path / "plain.gguf", all_types(Q.Q8_0), threads=2, quiet=True)
    kimi = shutil.copytree(folder, tmp_path / "kimi_k25")
    (kimi / "config.json").write_text(json.dumps({"model_type": "kimi_k25",
                                                   "architectures": ["KimiK25ForConditionalGeneration"],
                                                   "text_config": {**text, "model_type": "kimi_k2"}}))
    with safe_open(folder / "model.safetensors", "pt") as f:
        save_file({"language_model." + k: f.get_tensor(k) for k in f.keys()}, str(kimi / "model.safetensors"))
    out = convert_hf(str(kimi), tmp_path / "kimi.gguf", all_types(Q.Q8_0), threads=2, quiet=True)
    assert expert_bytes([out]) == expert_bytes([plain])
    assert lvgg.ExpertStore(out).metadata()["lvgg.architecture"] == "kimi_k2"
    check_before_start(str(kimi), [out])


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "llama4"])
def test_llama_cpps_gguf_of_a_multimodal_checkpoint_holds_the_experts_lvgg_converts(model_type, tmp_path):
    """llama.cpp's own converter on the checkpoint as the Hub ships it (Qwen3-VL's fused tensors
    as [E, in, out]): the GGUF passes serve's startup check against the model folder, its experts
    are the ones `lvgg convert` writes, and lvgg computes transformers' experts from it."""
    from transformers import AutoModelForImageTextToText

    tree = llama_cpp.upstream_tools()
    folder = make_tiny_multimodal(model_type, tmp_path / model_type, seed=5, tokenizer=llama_cpp.gpt2_tokenizer(tree))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    if model_type == "qwen3_vl_moe":
        as_the_hub_ships_it(folder, model_type)
    theirs = llama_cpp.convert_hf(folder, tmp_path / "llama.cpp-F32.gguf", tree)
    ours = convert_hf(str(folder), tmp_path / "lvgg-F32.gguf", all_types(Q.F32), threads=2, quiet=True)
    check_before_start(str(folder), [theirs])
    experts = {name: np.asarray(t.data) for name, t in
               ((t.name, t) for t in gguf.GGUFReader(theirs).tensors) if "_exps." in name}
    mine = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(ours).tensors}
    assert sorted(experts) == sorted(mine)
    for name, data in experts.items():
        np.testing.assert_array_equal(data, mine[name], err_msg=name)
    text = MULTIMODAL_TEXT[model_type]
    check_against_transformers(text, model, lvgg.ExpertStore(theirs), ACTIVATION.get(text, "silu"), TOLERANCE[Q.F32])


# --- --from-gguf ---------------------------------------------------------------------------

def expert_bytes(paths):
    found = {}
    for p in paths:
        for t in gguf.GGUFReader(p).tensors:
            if "_exps" in t.name:
                found[t.name] = (int(t.tensor_type), bytes(np.asarray(t.data).view(np.uint8)))
    return found


@pytest.mark.parametrize("split", [0, 3])
def test_from_gguf_copies_expert_tensors_byte_for_byte(tmp_path, split):
    rng = np.random.default_rng(1)
    write_llamacpp_gguf(tmp_path / "model.gguf", rng, split_max_tensors=split)
    sources = sorted(tmp_path.glob("model*.gguf"))
    assert len(sources) == (1 if not split else 3)
    out = convert_gguf(sources[0], tmp_path / "experts.gguf", None, threads=1, quiet=True)
    assert expert_bytes([out]) == expert_bytes(sources)
    store = lvgg.ExpertStore(out)
    assert store.layers == [0, 1] and store.metadata()["qwen3moe.expert_count"] == 8
    assert "blk.0.attn_q.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}


def test_from_gguf_requantizes_when_asked(tmp_path):
    rng = np.random.default_rng(2)
    write_llamacpp_gguf(tmp_path / "model.gguf", rng)
    out = convert_gguf(tmp_path / "model.gguf", tmp_path / "q8.gguf", all_types(Q.Q8_0), threads=2, quiet=True)
    src = {t.name: t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type == Q.Q8_0
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        b = gguf.quants.dequantize(src[t.name].data, src[t.name].tensor_type)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2


def test_split_set_needs_every_shard(tmp_path):
    rng = np.random.default_rng(1)
    write_llamacpp_gguf(tmp_path / "model.gguf", rng, split_max_tensors=3)
    (tmp_path / "model-00002-of-00003.gguf").unlink()
    with pytest.raises(FileNotFoundError, match="missing 1 of its 3 parts: model-00002-of-00003.gguf"):
        convert_gguf(tmp_path / "model-00001-of-00003.gguf", tmp_path / "e.gguf", None, 1, True)


# --- fp8 -----------------------------------------------------------------------------------

def test_fp8_block_scaled_experts_are_dequantized(tmp_path):
    folder = make_tiny_model("qwen3_moe", tmp_path / "m", seed=4, dtype="float32")
    tensors, expected = {}, {}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if ".experts." in k:  # 128x128 blocks, scale = amax / 448 per block
                blocks = t.reshape(t.shape[0] // 128, 128, t.shape[1] // 128, 128)
                scale = blocks.abs().amax(dim=(1, 3)) / 448.0
                q = (blocks / scale[:, None, :, None]).reshape(t.shape).to(torch.float8_e4m3fn)
                tensors[k], tensors[k[: -len(".weight")] + ".weight_scale_inv"] = q, scale.float()
                expected[k] = (q.float().reshape(blocks.shape) * scale[:, None, :, None]).reshape(t.shape)
            else:
                tensors[k] = t
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg))
    out = convert_hf(str(folder), tmp_path / "e.gguf", all_types(Q.F32), threads=1, quiet=True)
    reader = {t.name: t for t in gguf.GGUFReader(out).tensors}
    down = reader[gguf_expert_name(2, "down")].data  # [E, D, F]
    np.testing.assert_array_equal(down[5], expected["model.layers.2.mlp.experts.5.down_proj.weight"].numpy())
    assert lvgg.ExpertStore(out).metadata()["lvgg.source_format"] == "safetensors-f8_e4m3"


# --- failures leave nothing behind -----------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3"), seed=5)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_interrupted_conversion_leaves_no_file(qwen3, tmp_path, monkeypatch, failure):
    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def failing(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise failure
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(type(failure), match="disk full or file-size limit" if isinstance(failure, OSError) else None):
        convert_hf(str(qwen3), tmp_path / "e.gguf", all_types(Q.Q8_0), threads=1, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_fails_before_any_work(qwen3, tmp_path):
    with pytest.raises(ValueError, match="does not exist; create it first"):
        convert_hf(str(qwen3), tmp_path / "nope" / "e.gguf", all_types(Q.Q8_0), threads=1, quiet=True)


def test_unknown_architecture_lists_the_supported_ones(qwen3, tmp_path):
    cfg = json.loads((qwen3 / "config.json").read_text())
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported architecture 'llama'.*deepseek_v3.*qwen3_moe"):
        convert_hf(str(bad), tmp_path / "e.gguf", all_types(Q.Q8_0), threads=1, quiet=True)


def _rewrite(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_missing_expert_tensor_is_named_with_its_shape(qwen3, tmp_path):
    _rewrite(qwen3, tmp_path / "m", lambda t: t.pop("model.layers.2.mlp.experts.7.up_proj.weight"))
    with pytest.raises(ValueError, match=r"no tensor 'model.layers.2.mlp.experts.7.up_proj.weight' \(expected shape \[256, 256\]\)"):
        convert_hf(str(tmp_path / "m"), tmp_path / "e.gguf", all_types(Q.Q8_0), threads=1, quiet=True)
    assert not (tmp_path / "e.gguf").exists()


def test_wrong_expert_shape_is_named(qwen3, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.experts.1.down_proj.weight"] = torch.zeros(256, 128, dtype=torch.bfloat16)
    _rewrite(qwen3, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=r"experts.1.down_proj.weight' has shape \[256, 128\], expected \[256, 256\]"):
        convert_hf(str(tmp_path / "m"), tmp_path / "e.gguf", all_types(Q.Q8_0), threads=1, quiet=True)


def test_unsupported_source_dtype_is_named(qwen3, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(256, 256, dtype=torch.int8)
    _rewrite(qwen3, tmp_path / "m", edit)
    with pytest.raises(ValueError, match="has dtype I8, which lvgg convert cannot read"):
        convert_hf(str(tmp_path / "m"), tmp_path / "e.gguf", all_types(Q.Q8_0), threads=1, quiet=True)


def test_uncached_model_id_in_offline_mode_says_so(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "lvgg.cli", "convert", "someorg/somemodel", "-o",
                           str(tmp_path / "e.gguf"), "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in done.stderr.replace("\n", " ")


def test_bad_type_names_are_refused():
    with pytest.raises(ValueError, match="unsupported output type 'Q9_K'"):
        projection_types("Q9_K", None)
    with pytest.raises(ValueError, match="PROJ=TYPE pairs"):
        projection_types("Q4_K", "attn=Q8_0")


# --- memory --------------------------------------------------------------------------------

_RSS_SCRIPT = """
import sys
from pathlib import Path
from lvgg.convert.hf_to_gguf import convert_hf
from lvgg.convert.output_types import projection_types
import torch, safetensors, gguf  # imported before the baseline

def status_kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status_kib("VmRSS")
convert_hf(sys.argv[1], Path(sys.argv[2]), projection_types("Q8_0", None), threads=2, quiet=True)
print(base, status_kib("VmHWM"))
"""


def test_peak_memory_stays_within_one_layer(tmp_path):
    # 6 MoE layers of 16 experts, 1024 x 1024: one layer's experts are 192 MiB in f32, the model 576 MiB
    folder = make_tiny_model("qwen3_moe", tmp_path / "big", seed=6, hidden_size=1024, moe_intermediate_size=1024,
                             num_experts=16, num_hidden_layers=6, mlp_only_layers=[], intermediate_size=1024,
                             dtype="bfloat16")
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(folder), str(tmp_path / "e.gguf")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    base_kib, peak_kib = map(int, done.stdout.split()[-2:])
    one_layer_f32 = 3 * 16 * 1024 * 1024 * 4
    grew = (peak_kib - base_kib) * 1024
    print(f"peak RSS growth {grew / 2**20:.0f} MiB; one layer of experts in f32 is {one_layer_f32 / 2**20:.0f} MiB")
    assert grew <= one_layer_f32 + 96 * 2**20


# --- CLI -----------------------------------------------------------------------------------

def test_cli_convert_then_inspect(qwen3, tmp_path):
    runner = CliRunner()
    out = tmp_path / "e.gguf"
    r = runner.invoke(app, ["convert", str(qwen3), "-o", str(out), "--type", "Q4_K", "--types", "down=Q6_K", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "architecture qwen3moe, 2 MoE layers" in r.output
    assert "gate=Q4_K up=Q4_K down=Q6_K" in r.output
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    r = runner.invoke(app, ["inspect", str(truncated)])
    assert r.exit_code == 2 and "is truncated: tensor 'blk." in r.output and "did not finish" in r.output, r.output


def test_cli_convert_reports_errors_without_traceback(tmp_path):
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "e.gguf")])
    assert r.exit_code == 2
    assert "no such model folder" in r.output


# --- int4 W4A16 ----------------------------------------------------------------------------

def _pack_nibbles(q, order):
    """uint8 [r, c] (0..15) -> int32 [r, c/8]; column order[i] of each group of 8 goes to nibble i."""
    q = q.astype(np.uint32).reshape(q.shape[0], -1, 8)
    packed = np.zeros(q.shape[:2], dtype=np.uint32)
    for i, col in enumerate(order):
        packed |= q[:, :, col] << np.uint32(4 * i)
    return torch.from_numpy(packed.view(np.int32))


@pytest.mark.parametrize("layout", ["awq", "compressed-tensors"])
def test_int4_checkpoints_are_dequantized(tmp_path, layout):
    folder = make_tiny_model("mixtral", tmp_path / "m", seed=8, dtype="float32")
    group = 64
    tensors, dequantized = {}, {}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for k in f.keys():
            w = f.get_tensor(k).numpy()
            if ".experts." not in k:
                tensors[k] = torch.from_numpy(w)
                continue
            base = k[: -len(".weight")]
            out_f, in_f = w.shape
            g = w.reshape(out_f, in_f // group, group)
            if layout == "awq":  # asymmetric, zero points per group; stored [in, out]
                lo, hi = g.min(-1), g.max(-1)
                scale = (hi - lo) / 15.0
                zero = np.clip(np.round(-lo / scale), 0, 15)
                q = np.clip(np.round(g / scale[..., None]) + zero[..., None], 0, 15)
                tensors[base + ".qweight"] = _pack_nibbles(q.reshape(out_f, in_f).T, (0, 2, 4, 6, 1, 3, 5, 7))
                tensors[base + ".qzeros"] = _pack_nibbles(zero.T, (0, 2, 4, 6, 1, 3, 5, 7))
                tensors[base + ".scales"] = torch.from_numpy(np.ascontiguousarray(scale.T.astype(np.float16)))
                deq_scale = scale.T.astype(np.float16).astype(np.float32).T
                deq = (q - zero[..., None]) * deq_scale[..., None]
            else:  # symmetric, values -8..7 stored +8; [out, in]
                scale = np.abs(g).max(-1) / 7.0
                q = np.clip(np.round(g / scale[..., None]), -8, 7) + 8
                tensors[base + ".weight_packed"] = _pack_nibbles(q.reshape(out_f, in_f), range(8))
                tensors[base + ".weight_scale"] = torch.from_numpy(scale.astype(np.float32))
                tensors[base + ".weight_shape"] = torch.tensor([out_f, in_f])
                deq = (q - 8) * scale[..., None]
            dequantized[k] = deq.reshape(out_f, in_f).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    out = convert_hf(str(folder), tmp_path / "e.gguf", all_types(Q.F32), threads=1, quiet=True)
    reader = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for layer, proj, e in [(0, "gate", 3), (2, "down", 7), (1, "up", 0)]:
        hf = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{ARCHITECTURES['mixtral'].hf_proj[proj]}.weight"
        np.testing.assert_allclose(reader[gguf_expert_name(layer, proj)].data[e], dequantized[hf], rtol=1e-5,
                                   atol=1e-6)


def test_a_file_size_limit_stops_the_conversion_with_one_line_and_no_file(qwen3, tmp_path):
    """A real short write (ulimit -f: EFBIG, which numpy reports without an errno), as a full disk gives."""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY)); "
              "from lvgg.cli import app; sys.argv[0] = 'lvgg'; app()")
    done = subprocess.run([sys.executable, "-c", script, "convert", str(qwen3), "-o", str(tmp_path / "e.gguf"),
                           "--type", "F32", "--quiet"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "(disk full or file-size limit)" in done.stderr and "at most (ulimit -f)" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_step3p5_experts_stacked_or_one_per_expert_convert_alike(tmp_path):
    """Step-3.5's released checkpoint stacks each projection's experts in one [E, out, in] tensor
    (moe.gate_proj.weight); vLLM also reads them one per expert. Both convert to the same bytes:
    the checkpoint's own, as llama.cpp names them."""
    from lvgg.testing.tiny_models import make_tiny_step3p5

    files = [convert_hf(str(make_tiny_step3p5(tmp_path / name, seed=3, stacked=stacked)), tmp_path / f"{name}.gguf",
                        projection_types("F32", None), 2, True) for name, stacked in (("stacked", True), ("one", False))]
    stacked, one = ({t.name: np.array(t.data) for t in gguf.GGUFReader(f).tensors} for f in files)
    assert sorted(stacked) == [f"blk.{layer}.ffn_{p}_exps.weight" for layer in (1, 2) for p in ("down", "gate", "up")]
    assert all(np.array_equal(stacked[name], one[name]) for name in stacked)
    with safe_open(tmp_path / "stacked" / "model.safetensors", "np") as f:
        assert np.array_equal(stacked["blk.2.ffn_gate_exps.weight"], f.get_tensor("model.layers.2.moe.gate_proj.weight"))
