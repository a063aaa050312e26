"""lvgg on GGUF files no one here wrote: llama.cpp's converter makes the model file, ggml's quantizer
quantizes its routed experts to every type a community GGUF may hold, llama.cpp runs it, and lvgg
(in vLLM, experts read from that same file) must give llama.cpp's greedy tokens.

The tiny model's dense weights stay float32 in the file and in vLLM (from the checkpoint), so both
runs compute the same model and differ only in rounding: vLLM's torch kernels against llama.cpp's
for the dense part, and for the experts lvgg's ggml build (its own repacked layouts) against
llama.cpp's plain kernels, each quantizing its own activations (to Q8_K/Q8_0/Q8_1/F16/BF16 as the
type asks) from slightly different inputs. A greedy token may then differ only where the two best
tokens are that close: see NOISE.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from lvgg.testing.llama_cpp import (convert_hf, divergences, expert_types_of, greedy_runs, make_tiny_gpt2_vocab_model,
                                    requantize_experts, upstream_tools)

SCRIPT = Path(__file__).with_name("vllm_generate.py")
TOKENS = 32
TEXTS = ["The experts of a mixture", "Each token picks a few experts; their outputs are weighted and",
         "Quantized weights are read from RAM", "1, 2, 3,"]

# Unsloth-style dynamic quant (e.g. UD-Q2_K_XL): types differ by layer and by projection.
MIXED = {(0, "gate"): Q.IQ2_XXS, (0, "up"): Q.IQ2_XXS, (0, "down"): Q.Q3_K,
         (1, "gate"): Q.IQ3_S, (1, "up"): Q.Q2_K, (1, "down"): Q.Q4_K,
         (2, "gate"): Q.IQ4_XS, (2, "up"): Q.Q5_K, (2, "down"): Q.Q6_K}

# The noise of each expert type: the largest log-probability difference allowed between lvgg's and
# llama.cpp's runs where their tokens agree, and the top-2 margin under which a run's greedy choice is
# a coin toss there (a divergence is no failure where either run's margin is below it).
# Where the two runs' hidden states differ by float rounding, an activation quantized for the
# type's dot product (F32: not at all; F16, BF16; Q8_0/Q8_1 per 32 values; Q8_K per 256) now and
# then rounds a value to the next step on one side only: that step, not the weights' precision,
# sets the noise. Measured (4 prompts x 32 tokens, all 8 experts, 4 models: seeds 5, 6, 7 untied and
# this one; AMD EPYC, AVX2, lvgg on ggml's kernels), the largest difference: F32 5e-6 (vLLM's torch
# against llama.cpp in the dense part alone), F16 3.2e-4, BF16 2.3e-3, Q8_0/Q8_1-activation types
# 8.5e-3, Q8_K ones 2.1e-2; at the divergences (1 to 7 of the 24 files per model) the smaller
# margin <= 2.2e-3, the larger <= 1e-2. NOISE is 2.4x (Q8_K) to 20x (F32) those; test_numerics'
# relative errors of the engine for F16, BF16 and Q8_0 (2e-3, 8e-3, 2.5e-2) are the same size,
# from the same cause.
_F32, _F16, _BF16, _Q8_0_ACT, _Q8_K_ACT = 1e-4, 2e-3, 1e-2, 3e-2, 5e-2
NOISE = {
    Q.F32: _F32, Q.F16: _F16, Q.BF16: _BF16,
    **{q: _Q8_0_ACT for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.MXFP4)},
    **{q: _Q8_K_ACT for q in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS,
                              Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S)},
}
NAMES = [q.name for q in NOISE] + ["mixed"]
# Every token goes to all 8 experts. With top-2 of 8, vLLM's router and llama.cpp's, fed hidden
# states a rounding apart, pick different second experts wherever the 2nd and 3rd router logits
# nearly tie, and that token's log-probabilities then differ by up to ~0.4 with both runs sure of
# their tokens (measured: Q6_K, last layer's 2nd-3rd gap 0.007 in an f64 reference; swapping the
# expert there reproduced lvgg's log-probability to 0.01): no margin tells that from a wrong kernel.
# With all experts used, routing only weighs them, continuously, and the runs differ by rounding.
ALL_EXPERTS = 8


def noise_of(name):
    return max(NOISE[q] for q in MIXED.values()) if name == "mixed" else NOISE[Q[name]]


@pytest.fixture(scope="module")
def community(tmp_path_factory):
    """The model, llama.cpp's F32 file and one file per type (+ the mixed one), the prompts' ids,
    and llama.cpp's greedy runs on every file."""
    from transformers import AutoTokenizer

    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("community")
    tree = upstream_tools()
    folder = make_tiny_gpt2_vocab_model(tmp / "tiny-qwen3-moe", tree, seed=5, num_experts_per_tok=ALL_EXPERTS)
    f32 = convert_hf(folder, tmp / "tiny-qwen3-moe-F32.gguf", tree)  # llama.cpp's own file, as it wrote it
    wanted = {tmp / f"tiny-qwen3-moe-{q.name}.gguf": q for q in NOISE if q != Q.F32}
    wanted[tmp / "tiny-qwen3-moe-mixed.gguf"] = MIXED
    files = {"F32": f32}
    for path in requantize_experts(f32, wanted, threads=2):
        files[path.stem.rsplit("-", 1)[1]] = path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(text).input_ids for text in TEXTS]
    built = time.monotonic()
    # one thread, as vLLM and lvgg get in vllm_generate.py: ggml's threads spin at every barrier, and
    # 2 threads on 2 cores beside another busy process took 150-160 s here instead of 23 (1: 27 s)
    runs = greedy_runs([files[n] for n in NAMES], prompts, TOKENS, threads=1)
    print(f"\ncommunity GGUFs: files in {built - started:.0f} s, llama.cpp's runs in {time.monotonic() - built:.0f} s")
    return folder, files, prompts, {name: runs[str(files[name])] for name in NAMES}


def vllm_greedy(folder, prompts, experts=None):
    """vLLM's greedy run of the prompts' ids (float32, eager), with lvgg's experts from `experts`
    or (None) stock."""
    cmd = [sys.executable, str(SCRIPT), str(folder), "--eager", "--dtype", "float32", "--tokens", str(TOKENS),
           "--prompt-ids", json.dumps(prompts)] + (["--experts", str(experts)] if experts else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{' '.join(cmd)}\nrc={done.returncode}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_files_are_llama_cpps_with_the_experts_of_each_type(community):
    import gguf

    _, files, prompts, _ = community
    f32 = gguf.GGUFReader(files["F32"])
    assert f32.fields["general.architecture"].contents() == "qwen3moe"
    assert f32.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the converter recognized GPT-2's tokenizer
    assert not f32.fields["tokenizer.ggml.add_bos_token"].contents()  # no BOS: the prompts' ids are the texts'
    assert all(t.tensor_type == Q.F32 for t in f32.tensors)
    for name in NAMES:
        types = expert_types_of(files[name])
        assert len(types) == 9  # 3 layers x gate, up, down
        assert types == ({k: q.name for k, q in MIXED.items()} if name == "mixed" else {k: name for k in types})
    assert len({len(p) for p in prompts}) > 1


@pytest.mark.parametrize("name", NAMES)
def test_lvgg_gives_llama_cpps_greedy_tokens(community, name):
    folder, files, prompts, llama = community
    ours = vllm_greedy(folder, prompts, files[name])
    assert ours["moe_methods"] == ["LvggMoEMethod"] and ours["expert_param_bytes"] == 0
    assert ours["prompt_tokens"] == prompts  # the same ids on both sides
    noise = noise_of(name)
    found = divergences(ours, llama[name])
    report = "; ".join(f"prompt {d.prompt}: " + ("all equal" if d.position is None else
                       f"diverged at {d.position} (margins lvgg {d.margins[0]:.2g}, llama.cpp {d.margins[1]:.2g})")
                       + f", max logprob diff {d.max_logprob_diff:.2g}" for d in found)
    print(f"\n{name}: {report}")
    for d in found:
        assert d.max_logprob_diff <= noise, f"{name}: {report}"
        if d.position is not None:
            assert min(d.margins) <= noise, f"{name}: {report}"
    # a divergence is rare (within noise of a tie): most generated tokens are compared
    assert sum(d.compared for d in found) >= TOKENS * len(prompts) // 2, f"{name}: {report}"
