"""vLLM on the GPU with lvgg's experts, Qwen3-30B-A3B shapes: decode, 8 and 16 concurrent decodes and
long prefills, one configuration per process, printed as one table.

The dense part has vLLM's dummy weights (`load_format="dummy"`, only config.json is written);
the experts file is synthetic Q4_K_M (gate/up Q4_K, down Q6_K), 48 layers, 18.8 GB: lvgg's
own (default) or any GGUF of that model, e.g. the one ../shared/anchors/synth_gguf.py writes
for llama.cpp (--experts), so both read the same bytes. Needs an NVIDIA GPU and vLLM.

    python bench/gpu_rig.py [--configs stream,split,split:2,resident,cpu] [--threads 15] [--experts FILE]
                            [--parallel 1,tp2,pp2,ep2]

Configurations: `cpu` (every expert on the CPU; prefill 512 only, in one pass), `stream` (passes
of >= 64 tokens stream the experts to the GPU, decode on the CPU), `split` (stream, and decode
steps give some of each token's experts to the GPU: LVGG_GPU_DECODE_SPLIT=auto; `split:N`: N of
them), `resident` (split, plus LVGG_GPU_RESIDENT_LAYERS=auto). A suffix `@GIB` bounds lvgg's VRAM
(LVGG_GPU_EXPERTS_GB), e.g. `stream@0.5` streams 30B-A3B's layers 32 experts at a time.
`--parallel` runs every configuration once per GPU layout (PARALLEL: one GPU; two, tensor
parallel, pipeline parallel, or expert parallel over the tensor-parallel ranks), side by side.
Also printed: the time to read the experts file once (from the page cache when it is there),
next to the startup times: init (vLLM's start to ready) and open_to_first_token (lvgg opening
the experts file to the first token out), and with one GPU the host memory of the process
after the first tokens (RssAnon: its own pages, lvgg's copies of the experts among them;
RssFile: pages of the mapped experts file, which a GPU reading it pins).
Decode: time of N+1 output tokens minus time of 1, divided by N (greedy, ignore_eos).
Prefill: one pass of a random prompt (max_num_batched_tokens fits the longest), first token
included.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from lvgg.bench import scratch_dir

CONFIGS = {"cpu": {"LVGG_GPU_PREFILL_MIN_TOKENS": "off", "LVGG_GPU_DECODE_SPLIT": "off"},
           "stream": {"LVGG_GPU_PREFILL_MIN_TOKENS": "64", "LVGG_GPU_DECODE_SPLIT": "off"},
           "split": {"LVGG_GPU_PREFILL_MIN_TOKENS": "64", "LVGG_GPU_DECODE_SPLIT": "auto"},
           "resident": {"LVGG_GPU_PREFILL_MIN_TOKENS": "64", "LVGG_GPU_RESIDENT_LAYERS": "auto",
                        "LVGG_GPU_DECODE_SPLIT": "auto"}}


# GPU layouts: vLLM's tensor_parallel_size, pipeline_parallel_size, enable_expert_parallel
PARALLEL = {"1": (1, 1, False), "tp2": (2, 1, False), "pp2": (1, 2, False), "ep2": (2, 1, True)}


# configuration suffixes: "+ggml" runs ggml's CPU kernels for every type, "+norepack" computes
# from the file's own layout (no repacked copy)
SUFFIXES = {"ggml": {"LVGG_CPU_KERNELS": "ggml"}, "norepack": {"LVGG_REPACK": "off"}}


def config_env(name: str) -> dict[str, str]:
    """The environment of a configuration: a name of CONFIGS, or split:N; then SUFFIXES, e.g.
    stream+ggml or split+norepack; "@GIB" bounds lvgg's VRAM."""
    name, _, gib = name.partition("@")
    name, *suffixes = name.split("+")
    base, _, slots = name.partition(":")
    env = {**CONFIGS[base], **({"LVGG_GPU_DECODE_SPLIT": slots} if slots else {}),
           **({"LVGG_GPU_EXPERTS_GB": gib} if gib else {})}
    for suffix in suffixes:
        env.update(SUFFIXES[suffix])
    return env


def read_once(path: Path, chunk: int = 64 << 20) -> float:
    """Seconds to read ``path`` once, sequentially."""
    buf = bytearray(chunk)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t

_CHILD = r"""
import json, os, random, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
model, experts, threads, eager = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
prefills = [int(n) for n in sys.argv[5].split(",")]
tp, pp, ep = json.loads(sys.argv[6])
if pp > 1:  # vLLM's in-process engine cannot schedule pipeline stages
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
import lvgg
from vllm import SamplingParams
batch = max(512, *prefills) + 128
t0 = time.perf_counter()
llm = lvgg.LLM(model, experts=experts, cpu_threads=threads or None, load_format="dummy", dtype="bfloat16",
               max_model_len=batch, max_num_batched_tokens=batch, max_num_seqs=16, enforce_eager=eager,
               gpu_memory_utilization=0.6, skip_tokenizer_init=True, enable_prefix_caching=False,
               compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16]}, seed=0,
               tensor_parallel_size=tp, pipeline_parallel_size=pp, enable_expert_parallel=ep)
init_s = time.perf_counter() - t0
rng = random.Random(0)
def run(n_seqs, n_in, n_out):
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 150000) for _ in range(n_in)]} for _ in range(n_seqs)]
    sp = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    return time.perf_counter() - t
run(1, 16, 1)
from lvgg.vllm_plugin import runtime
result = {"init_s": init_s}
if runtime.process.opened_at is not None:  # the engine is in this process (one GPU)
    result["open_to_first_token_s"] = time.perf_counter() - runtime.process.opened_at
    from lvgg.testing.worker_info import resident_memory
    memory = resident_memory()
    for key in ("RssAnon", "RssFile"):  # the process's own pages (vLLM's, lvgg's copies); mapped file pages
        result[f"{key}_GiB"] = memory[key] / 2**30
run(1, 16, 8)
one, many = min(run(1, 16, 1) for _ in range(2)), min(run(1, 16, 65) for _ in range(2))
result["decode_tok_s"] = 64 / (many - one)
for n in (8, 16):
    result[f"concurrent{n}_tok_s"] = n * 32 / (run(n, 16, 33) - run(n, 16, 1))
for n in prefills:
    result[f"prefill{n}_tok_s"] = n / min(run(1, n, 1) for _ in range(2))
print("RESULT " + json.dumps(result), flush=True)
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
    ap.add_argument("--configs", default="stream,resident")
    ap.add_argument("--threads", type=int, default=15, help="CPU threads per rank (0: each rank's share of the cores)")
    ap.add_argument("--parallel", default="1", help="GPU layouts, a subset of " + ",".join(PARALLEL))
    ap.add_argument("--prefill", default="4096,16384", help="prompt lengths (the cpu config runs 512 only)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", help="an existing GGUF with the model's experts (default: write one)")
    ap.add_argument("--workdir")
    ap.add_argument("--eager", action="store_true")
    a = ap.parse_args()
    from lvgg.bench import SHAPE_30B_A3B as S
    from lvgg.bench import synthetic_experts_file

    with scratch_dir(a.workdir) as tmp:
        model = write_config(Path(tmp) / "model", a.layers)
        experts = Path(a.experts) if a.experts else None
        if experts is None:
            t = time.perf_counter()
            experts = synthetic_experts_file(Path(tmp) / "experts-Q4_K_M.gguf", {"gate": Q.Q4_K, "up": Q.Q4_K,
                                             "down": Q.Q6_K}, a.layers, S["n_experts"], S["hidden"],
                                             S["intermediate"])
            print(f"experts file: {experts.stat().st_size / 1e9:.1f} GB written in {time.perf_counter() - t:.0f} s",
                  flush=True)
        read_s = read_once(experts)
        print(f"experts file read once: {read_s:.1f} s ({experts.stat().st_size / read_s / 1e9:.1f} GB/s)", flush=True)
        rows = []
        for name, layout in ((n, p) for n in a.configs.split(",") for p in a.parallel.split(",")):
            prefills = "512" if name == "cpu" else a.prefill
            label = name if layout == "1" else f"{name} {layout}"
            done = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(experts), str(a.threads),
                                   "1" if a.eager else "0", prefills, json.dumps(PARALLEL[layout])],
                                  capture_output=True, text=True, timeout=1200, env={**os.environ, **config_env(name)})
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"{label} failed (rc={done.returncode}):\n{done.stderr[-4000:]}", flush=True)
                continue
            notes = [ln for ln in (done.stdout + done.stderr).splitlines() if "lvgg:" in ln]
            rows.append((label, json.loads(lines[-1][7:])))
            print(label, rows[-1][1], *notes[-6:], sep="\n  ", flush=True)
    columns = sorted({k for _, r in rows for k in r}, key=lambda k: (k[:7], len(k), k))
    print(f"\n30B-A3B Q4_K_M, {a.layers} layers, {a.threads} CPU threads, {'eager' if a.eager else 'CUDA graphs'} "
          f"(tok/s; init in s; the experts file read once: {read_s:.1f} s)")
    print(f"{'config':>15} " + " ".join(f"{c.replace('_tok_s', ''):>17}" for c in columns))
    for name, r in rows:
        print(f"{name:>15} " + " ".join(f"{r[c]:17.1f}" if c in r else f"{'-':>17}" for c in columns))


if __name__ == "__main__":
    main()
