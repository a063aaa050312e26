"""Model load of vLLM (CPU build): bytes read from the checkpoint and time, stock vs lvgg.

A Qwen3-30B-A3B-shaped model (hidden 2048, 128 experts of 768, bf16; few layers, small
vocabulary) is generated with random weights and its experts converted to an experts file.
Each row starts vLLM in a fresh process with the checkpoint evicted from the page cache (the
experts file is kept cached, so what is read from disk is the checkpoint):

- stock vLLM;
- lvgg reading and dropping the routed experts (vLLM's default loader: lvgg before it had its own);
- lvgg with its loader, which leaves them unread.

    python bench/vllm_load.py [--layers 2] [--type Q8_0] [--workdir DIR]

read_bytes is the process's /proc/self/io counter across building the `LLM`; "weights" is
vLLM's own "Loading weights took" figure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from lvgg.bench import scratch_dir

_RUN = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
model, experts, mode = sys.argv[1:4]
for f in os.listdir(model):
    if f.endswith(".safetensors"):
        fd = os.open(os.path.join(model, f), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
def read_bytes():
    with open("/proc/self/io") as f:
        return int(next(ln for ln in f if ln.startswith("read_bytes:")).split()[1])
kw = dict(model=model, dtype="bfloat16", max_model_len=512, max_num_seqs=1, enforce_eager=True)
r0, t0 = read_bytes(), time.perf_counter()
if mode == "stock":
    from vllm import LLM
    LLM(**kw)
else:
    import lvgg
    from lvgg.vllm_plugin import register
    if mode == "read-and-drop":  # the plugin, with vLLM's default loader left in place
        os.environ["LVGG_EXPERTS"] = experts
        register()
        from lvgg.vllm_plugin import compat
        for fmt in compat.model_loaders:
            if compat.model_loaders[fmt].__name__ == "LvggModelLoader":
                compat.model_loaders[fmt] = compat.DefaultModelLoader
    lvgg.LLM(experts=experts, **kw)
print("RESULT " + json.dumps({"read_bytes": read_bytes() - r0, "build_s": time.perf_counter() - t0}), flush=True)
os._exit(0)
"""


def run(model: Path, experts: Path, mode: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _RUN, str(model), str(experts), mode], capture_output=True,
                          text=True, env=env, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} run failed (rc={done.returncode}):\n{done.stderr[-3000:]}")
    weights = re.findall(r"Loading weights took ([\d.]+) seconds", done.stdout + done.stderr)
    return {**json.loads(lines[-1][7:]), "weights_s": float(weights[-1]) if weights else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--type", default="Q8_0")
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
        experts = Path(tmp) / f"experts-{a.type}.gguf"
        convert_hf(str(model), experts, projection_types(a.type, None), threads=a.threads, quiet=True)
        experts.read_bytes()  # cached: the rows below read the checkpoint from disk, nothing else
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        rows = [(mode, run(model, experts, mode, env)) for mode in ("stock", "read-and-drop", "lvgg")]
    print(f"\n30B-A3B-shaped model, {a.layers} layers, bf16 checkpoint of {size / 2**30:.2f} GiB, "
          f"{a.type} experts file")
    print(f"{'load':16} {'read from disk':>16} {'weights (s)':>12} {'LLM() (s)':>10}")
    for mode, r in rows:
        print(f"{mode:16} {r['read_bytes'] / 2**30:12.2f} GiB {r['weights_s']:12.2f} {r['build_s']:10.1f}")


if __name__ == "__main__":
    main()
