"""What a vLLM worker's model holds, for tests/vllm_generate.py's `LLM.apply_model` (a module
function: vLLM's engine process, a process of its own under pipeline parallelism, imports it
to unpickle it)."""
import os


def model_info(model) -> dict:
    """What a worker's model holds: routed-expert bytes, MoE and other quant methods, the nodes of
    lvgg's CPU engine in that process (1: one engine; 0: none), the CPUs its threads run on, the
    experts [begin, end) it holds of its first layer and the projections it holds repacked there,
    its layers and the activation it computes for each,
    and the process's resident memory (bytes: all, anonymous, file pages)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    engine_nodes, engine_bytes, engine_cpus, engine_experts, counts_real_rows = 0, 0, [], None, False
    engine_repacked, engine_layers, engine_activations = [], [], {}
    if os.environ.get("LVGG_EXPERTS"):
        from lvgg.vllm_plugin import moe_method, runtime

        counts_real_rows = moe_method.counts_real_rows
        engine = runtime.process.cpu_engine
        if engine is not None:
            engine_nodes = max(1, len(engine.nodes))
            engine_bytes = engine.store.expert_bytes  # a tensor-parallel rank's: its share
            engine_cpus = engine.cpus
            first = engine.store.layer_info(engine.store.layers[0])
            engine_experts = [first.held_experts.start, first.held_experts.stop]
            engine_repacked = sorted(p for p, repacked in first.repacked.items() if repacked)
            engine_layers = list(engine.store.layers)
            engine_activations = {layer: engine.activation_of(layer) for layer in engine_layers}
    # vLLM names routed-expert weights w13_* and w2_* (their scales and biases too); a layer's router
    # correction bias (e_score_correction_bias, GLM and ERNIE) is not an expert's
    return {"expert_bytes": sum(p.numel() * p.element_size() for m in experts for name, p in m.named_parameters()
                                if name.split(".")[-1].startswith(("w13", "w2"))),
            "methods": sorted({type(m.quant_method).__name__ for m in experts}),
            "others": sorted({type(m.quant_method).__name__ for m in model.modules()
                              if getattr(m, "quant_method", None) is not None and not isinstance(m, RoutedExperts)}),
            "engine_nodes": engine_nodes, "engine_expert_bytes": engine_bytes, "engine_cpus": engine_cpus,
            "engine_experts": engine_experts, "engine_repacked": engine_repacked, "engine_layers": engine_layers,
            "engine_activations": engine_activations,
            "expert_parallel": any(m.use_ep for m in experts), "counts_real_rows": counts_real_rows,
            "rss": resident_memory()}


def resident_memory() -> dict[str, int]:
    """This process's VmRSS, RssAnon and RssFile (/proc/self/status), in bytes."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile")))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
