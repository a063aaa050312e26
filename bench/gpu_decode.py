"""vLLM on the GPU with lvgg's experts on the CPU, 30B-A3B shapes: decode and short prefill.

The dense part has vLLM's dummy weights (`load_format="dummy"`, only config.json is written);
the experts file is synthetic Q4_K_M (gate/up Q4_K, down Q6_K), 48 layers, 18.8 GB. Each
configuration runs in its own process. Needs an NVIDIA GPU and vLLM.

    python bench/gpu_decode.py [--threads 16,15] [--layers 48] [--workdir DIR] [--eager]

Decode: time of N+1 output tokens minus time of 1, divided by N (greedy, ignore_eos).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGMLQuantizationType as Q

_CHILD = r"""
import json, os, random, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
import lvgg
from vllm import SamplingParams
model, experts, threads, eager = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
t0 = time.perf_counter()
llm = lvgg.LLM(model, experts=experts, cpu_threads=threads, load_format="dummy", dtype="bfloat16",
               max_model_len=4096, max_num_batched_tokens=512, max_num_seqs=8, enforce_eager=eager,
               gpu_memory_utilization=0.5, skip_tokenizer_init=True, enable_prefix_caching=False,
               compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]}, seed=0)
init_s = time.perf_counter() - t0
rng = random.Random(0)
def run(n_seqs, n_in, n_out):
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 150000) for _ in range(n_in)]} for _ in range(n_seqs)]
    sp = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    return time.perf_counter() - t
run(1, 16, 8)
one, many = min(run(1, 16, 1) for _ in range(2)), min(run(1, 16, 65) for _ in range(2))
c1, c8 = run(8, 16, 1), run(8, 16, 33)
prefill = min(run(1, 512, 1) for _ in range(2))
print("RESULT " + json.dumps({"init_s": init_s, "decode_tok_s": 64 / (many - one),
                              "concurrent8_tok_s": 8 * 32 / (c8 - c1), "prefill512_tok_s": 512 / prefill}), flush=True)
os._exit(0)
"""


def write_config(folder: Path, layers: int) -> Path:
    """Qwen3-30B-A3B's config.json (weights come from load_format=dummy)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
              "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
              "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
              "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
              "mlp_only_layers": [], "max_position_embeddings": 40960, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="16,15")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--workdir")
    ap.add_argument("--eager", action="store_true")
    a = ap.parse_args()
    from lvgg.bench import SHAPE_30B_A3B as S
    from lvgg.bench import synthetic_experts_file

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        model = write_config(Path(tmp) / "model", a.layers)
        t = time.perf_counter()
        experts = synthetic_experts_file(Path(tmp) / "experts-Q4_K_M.gguf", {"gate": Q.Q4_K, "up": Q.Q4_K,
                                         "down": Q.Q6_K}, a.layers, S["n_experts"], S["hidden"], S["intermediate"])
        print(f"experts file: {experts.stat().st_size / 1e9:.1f} GB written in {time.perf_counter() - t:.0f} s",
              flush=True)
        rows = []
        for threads in (int(n) for n in a.threads.split(",")):
            done = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(experts), str(threads),
                                   "1" if a.eager else "0"], capture_output=True, text=True, timeout=1200,
                                  env={**os.environ})
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"threads={threads} failed (rc={done.returncode}):\n{done.stderr[-4000:]}", flush=True)
                continue
            rows.append((threads, json.loads(lines[-1][7:])))
            print(threads, rows[-1][1], flush=True)
    print(f"\n30B-A3B Q4_K_M experts on the CPU, {a.layers} layers, {'eager' if a.eager else 'CUDA graphs'}")
    print(f"{'threads':>7} {'init s':>7} {'decode tok/s':>13} {'8 seqs tok/s':>13} {'prefill-512 tok/s':>18}")
    for threads, r in rows:
        print(f"{threads:7d} {r['init_s']:7.0f} {r['decode_tok_s']:13.1f} {r['concurrent8_tok_s']:13.1f} "
              f"{r['prefill512_tok_s']:18.0f}")


if __name__ == "__main__":
    main()
