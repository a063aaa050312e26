"""Run one model greedily through vLLM (stock, or with lvgg's experts) and print JSON.

usage: python tests/vllm_generate.py MODEL [--experts FILE] [--eager] [--tokens N] [--dtype float32] [--tp 1] [--pp 1]
       [--ep] [--prompts 4]
Run as its own process: the plugin's registration and vLLM's state are per process.
"""
import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the workers

PROMPTS = ["The experts of a mixture", "Each token picks a few", "Quantized weights are read",
           "from RAM at the speed of"]


def model_info(model) -> dict:
    """What a worker's model holds: routed-expert bytes, MoE and other quant methods, and the
    nodes of lvgg's CPU engine in that process (1: one engine; 0: none)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    engine_nodes, engine_bytes, counts_real_rows = 0, 0, False
    if os.environ.get("LVGG_EXPERTS"):
        from lvgg.vllm_plugin import moe_method, runtime

        counts_real_rows = moe_method.counts_real_rows
        if runtime._engine is not None:
            engine_nodes = max(1, len(runtime._engine.nodes))
            store = runtime._engine.store  # a tensor-parallel rank's: its share
            engine_bytes = sum(store.layer_info(layer).nbytes for layer in store.layers)
    return {"expert_bytes": sum(p.numel() * p.element_size() for m in experts for p in m.parameters()),
            "methods": sorted({type(m.quant_method).__name__ for m in experts}),
            "others": sorted({type(m.quant_method).__name__ for m in model.modules()
                              if getattr(m, "quant_method", None) is not None and not isinstance(m, RoutedExperts)}),
            "engine_nodes": engine_nodes, "engine_expert_bytes": engine_bytes,
            "expert_parallel": any(m.use_ep for m in experts), "counts_real_rows": counts_real_rows}


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
    a = ap.parse_args()
    ranks = a.tp * a.pp
    if ranks > 1:  # vllm-cpu binds one NUMA node per rank unless told which cores each rank gets
        cpus = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cpus[i % len(cpus)]) for i in range(ranks)))
    if a.pp > 1:  # vLLM's in-process engine cannot schedule pipeline stages
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from vllm import SamplingParams

    kwargs = dict(model=a.model, enforce_eager=a.eager, dtype=a.dtype, max_model_len=512, max_num_seqs=8, seed=0,
                  tensor_parallel_size=a.tp, pipeline_parallel_size=a.pp, enable_expert_parallel=a.ep)
    if a.experts:
        import lvgg

        llm = lvgg.LLM(experts=a.experts, cpu_threads=None if os.environ.get("LVGG_CPU_THREADS") else 1, **kwargs)
    else:
        from vllm import LLM

        llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True, logprobs=2)
    outs = llm.generate(PROMPTS[:a.prompts], params)
    ranks = llm.apply_model(model_info)  # in every worker (each tensor-parallel rank)
    expert_bytes = sum(r["expert_bytes"] for r in ranks)
    methods = sorted({m for r in ranks for m in r["methods"]})
    others = sorted({m for r in ranks for m in r["others"]})
    engine_nodes = ranks[0]["engine_nodes"]
    engine_bytes = [r["engine_expert_bytes"] for r in ranks]
    expert_parallel = all(r["expert_parallel"] for r in ranks)

    def gap(step):  # log-probability margin of the greedy token over the runner-up
        top = sorted((lp.logprob for lp in step.values()), reverse=True)
        return top[0] - top[1]

    print("RESULT " + json.dumps({
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [[step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                     for o in outs],
        "gaps": [[gap(step) for step in o.outputs[0].logprobs] for o in outs],
        "expert_param_bytes": expert_bytes, "moe_methods": methods,
        "other_quant_methods": others, "engine_nodes": engine_nodes,
        "engine_expert_bytes": engine_bytes, "expert_parallel": expert_parallel,
        "counts_real_rows": ranks[0]["counts_real_rows"]}), flush=True)
    os._exit(0)  # vLLM's engine may not exit by itself


if __name__ == "__main__":
    main()
