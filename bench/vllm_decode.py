"""Decode speed of vLLM (CPU build) with lvgg's experts vs stock vLLM's own CPU MoE kernel.

A 30B-A3B-shaped model (Qwen3-30B-A3B's hidden size, experts and attention; fewer layers and a
small vocabulary so it fits the test machine) is generated with random weights, its experts
converted to an experts file, and both engines decode the same prompt in this one run.

    python bench/vllm_decode.py [--layers 4] [--types BF16,Q4_K] [--tokens 256] [--workdir DIR]

Decode: time of N+1 output tokens minus time of 1, divided by N (batch 1, greedy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lvgg.bench import scratch_dir

_RUN = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import SamplingParams
model, experts, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kw = dict(model=model, dtype="bfloat16", max_model_len=512, max_num_seqs=1, seed=0)
if experts != "-":
    import lvgg
    llm = lvgg.LLM(experts=experts, **kw)
else:
    from vllm import LLM
    llm = LLM(**kw)
prompt = [{"prompt_token_ids": list(range(10, 42))}]
def run(tokens):
    t = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - t
run(4)  # warm-up
t1, tn = min(run(1) for _ in range(2)), min(run(n + 1) for _ in range(2))
print("RESULT " + json.dumps({"decode_tok_s": n / (tn - t1), "prefill_32_s": t1}), flush=True)
os._exit(0)
"""


def run(model: Path, experts: str, tokens: int, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _RUN, str(model), experts, str(tokens)], capture_output=True,
                          text=True, env=env, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"run failed (rc={done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--types", default="BF16,Q4_K")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir")
    a = ap.parse_args()
    from lvgg.convert.hf_to_gguf import convert_hf
    from lvgg.convert.output_types import projection_types
    from lvgg.testing.tiny_models import make_30b_a3b_shaped_model

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "VLLM_CPU_KVCACHE_SPACE": "1",
           "LVGG_CPU_THREADS": str(a.threads)}
    with scratch_dir(a.workdir) as tmp:
        model = make_30b_a3b_shaped_model(Path(tmp) / "model", a.layers)
        rows = [("stock vLLM (bf16 experts, its CPU MoE kernel)", run(model, "-", a.tokens, env))]
        for name in a.types.split(","):
            path = Path(tmp) / f"experts-{name}.gguf"
            t = time.perf_counter()
            convert_hf(str(model), path, projection_types(name, None), threads=a.threads, quiet=True)
            print(f"converted {name} in {time.perf_counter() - t:.0f} s", flush=True)
            rows.append((f"lvgg, {name} experts", run(model, str(path), a.tokens, env)))
    print(f"\n30B-A3B-shaped model, {a.layers} layers, batch 1, {a.threads} threads")
    print(f"{'engine':48} {'decode tok/s':>12} {'x stock':>8}")
    base = rows[0][1]["decode_tok_s"]
    for name, r in rows:
        print(f"{name:48} {r['decode_tok_s']:12.2f} {r['decode_tok_s'] / base:8.2f}")


if __name__ == "__main__":
    main()
