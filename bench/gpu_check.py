"""Hybrid vs all-GPU vLLM on a small generated model: greedy tokens, eager and CUDA graphs,
with the experts on the CPU, streamed to the GPU for every pass, split between the CPU and the GPU
in decode steps, and resident on the GPU.

Run on the GPU machine: python bench/gpu_check.py [--dtype float32] [--workdir DIR] [--parallel 1,tp2,pp2,ep2]
`--parallel` runs each placement once per GPU layout (one GPU; two, tensor parallel, pipeline
parallel, or expert parallel over the tensor-parallel ranks), each against stock vLLM on one GPU.
Each run is its own process (tests/vllm_generate.py) generating for 3 prompts, a batch that
CUDA graphs pad to 4 (whether lvgg left the padding row out is a column); prints a table and
exits non-zero when F32 experts choose another token than vLLM's own where its choice was not
a near-tie, or when a CUDA-graph run computed the padding.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from lvgg.bench import scratch_dir

GENERATE = Path(__file__).resolve().parent.parent / "tests" / "vllm_generate.py"


# F32 experts may diverge from stock vLLM only where stock's top two tokens are this close
# (its Triton matmuls use TF32; measured divergences sit at margins <= 0.0003)
NEAR_TIE = 0.01
# where the experts run: the CPU only; streamed to the GPU for every eager pass; decode steps split
# between the CPU and the GPU (one expert of each token on the GPU); resident on the GPU
PLACEMENTS = {"cpu": {"LVGG_GPU_PREFILL_MIN_TOKENS": "off", "LVGG_GPU_DECODE_SPLIT": "off"},
              "streamed": {"LVGG_GPU_PREFILL_MIN_TOKENS": "1", "LVGG_GPU_DECODE_SPLIT": "off"},
              "split": {"LVGG_GPU_PREFILL_MIN_TOKENS": "off", "LVGG_GPU_DECODE_SPLIT": "1"},
              "resident": {"LVGG_GPU_PREFILL_MIN_TOKENS": "off", "LVGG_GPU_RESIDENT_LAYERS": "auto"}}


# GPU layouts: tests/vllm_generate.py's arguments
PARALLEL = {"1": [], "tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "ep2": ["--tp", "2", "--ep"]}


def generate(model: Path, experts: Path | None, eager: bool, dtype: str, env: dict[str, str] | None = None,
             layout: str = "1") -> dict:
    cmd = [sys.executable, str(GENERATE), str(model), "--dtype", dtype, "--prompts", "3"] + \
        (["--eager"] if eager else []) + (["--experts", str(experts)] if experts else []) + PARALLEL[layout]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workdir")
    ap.add_argument("--placements", default=",".join(PLACEMENTS), help="a subset of " + ",".join(PLACEMENTS))
    ap.add_argument("--modes", default="eager,graphs", help="eager, graphs (CUDA graphs) or both")
    ap.add_argument("--parallel", default="1", help="GPU layouts, a subset of " + ",".join(PARALLEL))
    a = ap.parse_args()
    from lvgg.convert.hf_to_gguf import convert_hf
    from lvgg.models import PROJECTIONS
    from lvgg.testing.greedy import agreement
    from lvgg.testing.tiny_models import make_tiny_model

    qtype = Q.F32 if a.dtype == "float32" else Q.BF16
    with scratch_dir(a.workdir) as tmp:
        model = make_tiny_model("qwen3_moe", Path(tmp) / "model", seed=11, dtype=a.dtype)
        experts = convert_hf(str(model), Path(tmp) / "experts.gguf", {p: qtype for p in PROJECTIONS}, threads=4,
                             quiet=True)
        rows, failed = [], False
        for eager in [mode == "eager" for mode in a.modes.split(",")]:
            stock = generate(model, None, eager, a.dtype)
            for placement, layout in ((p, g) for p in a.placements.split(",") for g in a.parallel.split(",")):
                env = PLACEMENTS[placement]
                hybrid = generate(model, experts, eager, a.dtype, env, layout)
                mode = f"{'eager' if eager else 'CUDA graphs'}, {placement}{'' if layout == '1' else ' ' + layout}"
                same, diff, margin = agreement(hybrid, stock, mode)
                rows.append((mode, same, diff, margin, hybrid["counts_real_rows"], hybrid["expert_param_bytes"],
                              hybrid["moe_methods"]))
                failed |= qtype == Q.F32 and margin > NEAR_TIE
                failed |= not eager and placement in ("cpu", "split") and not hybrid["counts_real_rows"]
    print(f"\nqwen3_moe tiny model, {a.dtype}, {qtype.name} experts: hybrid vs all-GPU vLLM greedy tokens")
    print(f"{'mode':28} {'same tokens':>11} {'max logprob diff':>16} {'margin at split':>15} "
          f"{'padding left out':>16} {'vLLM expert bytes':>18}  moe method")
    for mode, same, diff, margin, counted, nbytes, methods in rows:
        print(f"{mode:28} {same:11.1%} {diff:16.4f} {margin:15.4f} {str(counted):>16} {nbytes:18d}  "
              f"{','.join(methods)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
