"""The `lvgg` command line: thin commands over the library."""
from __future__ import annotations

import contextlib
import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lvgg.convert.output_types import QUANTIZABLE


app = typer.Typer(help="Run Mixture-of-Experts LLMs with the routed experts on the CPU through ggml.",
                  no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (figures printed next to the floor measured in the same run).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _csv(value: str, cast=str) -> list:
    return [cast(v) for v in value.split(",") if v.strip()]


@app.command()
def info() -> None:
    """What this build of lvgg sees: CPU features, usable CPUs, physical cores."""
    from lvgg import _bridge

    console = Console()
    feats = _bridge.cpu_features()
    console.print("CPU features:", " ".join(k for k, v in feats.items() if v is True) or "none")
    console.print("lvgg's CPU kernels:", feats["lvgg_kernels"] or "none (ggml's)",
                  f"(built: {', '.join(feats['lvgg_kernel_sets']) or 'none'})")
    if feats["lvgg_kernel_types"]:
        console.print("  for:", ", ".join(feats["lvgg_kernel_types"]), "(other types: ggml's)")
    console.print("CPUs usable by this process:", len(_bridge.process_cpus()),
                  "| physical cores among them:", len(_bridge.physical_core_cpus()))


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Check this machine for lvgg: CPU, NUMA, memory, GPUs, versions; recommended settings.
    Exits with 1 when something blocks running lvgg."""
    import json

    from lvgg.doctor import collect, render

    try:
        facts = collect()
    except (ValueError, OSError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
    else:
        render(facts, Console(width=None if sys.stdout.isatty() else 132))
    if facts["blockers"]:
        raise typer.Exit(1)


def _fail(e: Exception) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@app.command()
def convert(
    src: str = typer.Argument(None, help="HF model folder or model id (org/name); omit with --from-gguf"),
    out: Path = typer.Option(..., "-o", "--out", help="experts file to write (.gguf)"),
    qtype: str = typer.Option(None, "--type", help="output type of every projection: " + ", ".join(QUANTIZABLE) +
                              " (default Q4_K; MXFP4 experts, as gpt-oss ships them, stay MXFP4; --from-gguf: the "
                              "file's types, copied)"),
    types: str = typer.Option(None, "--types", help="per projection, e.g. gate=Q4_K,up=Q4_K,down=Q6_K"),
    from_gguf: Path = typer.Option(None, "--from-gguf", help="copy the experts of a llama.cpp GGUF (first shard "
                                   "of a split set); with --type/--types they are requantized"),
    threads: int = typer.Option(0, help="quantization threads (0: one per physical core)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Write an experts file: every routed expert of a model, quantized with ggml."""
    from lvgg import _bridge

    threads = threads or len(_bridge.physical_core_cpus())
    try:
        from lvgg.convert.hf_to_gguf import DEFAULT_TYPE
        from lvgg.convert.output_types import projection_types

        # None: the converter's choice (a GGUF's types, or per checkpoint)
        chosen = None if qtype is None and types is None else projection_types(qtype or DEFAULT_TYPE.name, types)
        if from_gguf is not None:
            from lvgg.convert.gguf_to_gguf import convert_gguf

            written = convert_gguf(from_gguf, out, chosen, threads, quiet)
        elif src is None:
            raise ValueError("give a model folder or id, or --from-gguf FILE")
        else:
            from lvgg.convert.hf_to_gguf import convert_hf

            written = convert_hf(src, out, chosen, threads, quiet)
    except (ValueError, OSError, TypeError) as e:
        _fail(e)
    if not quiet:
        Console().print(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB)")


# lvgg's own options of `serve` and `plan` (every other flag goes to vLLM)
EXPERTS = typer.Option(None, "--experts", help="experts file: made by `lvgg convert`, or a llama.cpp GGUF as it is (a "
                       "split one: its first part), or a Hub quant org/repo:QUANT (default: the one .gguf in the "
                       "model folder; for a Hub model id, its experts converted on first run into lvgg's cache)")
EXPERTS_TYPE = typer.Option(None, "--experts-type", help="without --experts, for a Hub model id: the type its experts "
                            "are converted to on first run: Q4_K_M (default: Q4_K, down Q6_K; gpt-oss's MXFP4 stays), "
                            "a type (Q8_0) or TYPE:down=TYPE")
CPU_THREADS = typer.Option(0, "--cpu-threads", help="threads of the CPU MoE engine (0: one per physical core)")
GPU_PREFILL_MIN_TOKENS = typer.Option(None, "--gpu-prefill-min-tokens", help="passes of at least this many tokens "
                                      "stream the experts to the GPU (default 64; 'off')")
GPU_RESIDENT_LAYERS = typer.Option(None, "--gpu-resident-layers", help="layers whose experts stay on the GPU: "
                                   "'0-5,40' or 'auto'")
GPU_EXPERTS_GB = typer.Option(None, "--gpu-experts-gb", help="the most VRAM (GiB) lvgg's experts may take")
GPU_DECODE_SPLIT = typer.Option(None, "--gpu-decode-split", help="decode: N, the GPU computes N/top_k of a step's "
                                "experts (N of a token's) while the CPU does the rest: 'auto' (default: timed at "
                                "startup), N or 'off'")
REPACK = typer.Option(None, "--repack/--no-repack", help="--no-repack: the CPU computes the experts from the file's "
                      "own layout (ggml's kernels; slower decode, but next to a GPU one copy of the experts in RAM, not "
                      "two); default: a repacked copy unless the memory available cannot hold it beside the pinned file")
VLLM_FLAGS = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=VLLM_FLAGS)
def serve(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="HF model folder or id (its dense weights run in vLLM)"),
    experts: str = EXPERTS,
    experts_type: str = EXPERTS_TYPE,
    cpu_threads: int = CPU_THREADS,
    gpu_prefill_min_tokens: str = GPU_PREFILL_MIN_TOKENS,
    gpu_resident_layers: str = GPU_RESIDENT_LAYERS,
    gpu_experts_gb: float = GPU_EXPERTS_GB,
    gpu_decode_split: str = GPU_DECODE_SPLIT,
    repack: bool = REPACK,
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback unless told otherwise)"),
    port: int = typer.Option(8000, help="port to listen on"),
) -> None:
    """vLLM's OpenAI-compatible server with the routed experts on the CPU. Other flags go to vLLM."""
    from lvgg.llm import (KV_CACHE_FLAGS, configure_plugin, model_config, plan_checked, server_argv, settings_env,
                          speculative_config)

    kv_cache_chosen = any(arg.replace("_", "-").startswith(KV_CACHE_FLAGS) for arg in ctx.args)
    try:
        path = configure_plugin(model, experts, cpu_threads or None, gpu_prefill_min_tokens, gpu_resident_layers,
                                gpu_experts_gb, gpu_decode_split, repack, speculative_config(ctx.args), experts_type,
                                kv_cache_chosen)
        # the plan, as `lvgg plan` prints it (a model whose config vLLM fetches itself: its own log lines)
        config = model_config(model)
        planned = plan_checked(model, config, path, settings_env(), ctx.args) if config is not None else None
    except (ValueError, OSError) as e:
        _fail(e)
    if planned is not None:
        print_plan(Console(stderr=True, width=None if sys.stderr.isatty() else 132), planned)
    os.execv(sys.executable, server_argv(model, path, host, port, ctx.args))


@app.command(context_settings=VLLM_FLAGS)
def plan(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="HF model folder or id"),
    experts: str = EXPERTS,
    experts_type: str = EXPERTS_TYPE,
    cpu_threads: int = CPU_THREADS,
    gpu_prefill_min_tokens: str = GPU_PREFILL_MIN_TOKENS,
    gpu_resident_layers: str = GPU_RESIDENT_LAYERS,
    gpu_experts_gb: float = GPU_EXPERTS_GB,
    gpu_decode_split: str = GPU_DECODE_SPLIT,
    repack: bool = REPACK,
    bandwidth: float = typer.Option(None, help="the CPU's read bandwidth in GB/s for the decode bound (default: "
                                    "measured now, about a second)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Where `lvgg serve` with these flags would put the experts, read from the headers alone (no
    weights load): per rank its layers, share, CPUs, memory node and GPU layers, the host RAM and
    VRAM they take, and the decode bound. vLLM's flags (-tp, -pp, --enable-expert-parallel,
    --gpu-memory-utilization, --speculative-config, ...) count as serve would pass them."""
    import json

    from lvgg.llm import plan_serving, settings_env

    try:
        env = settings_env(cpu_threads or None, gpu_prefill_min_tokens, gpu_resident_layers, gpu_experts_gb,
                           gpu_decode_split, repack)
        if bandwidth is None:
            from lvgg import _bridge, bench

            bandwidth = bench.read_bandwidth_gb_per_s(len(_bridge.physical_core_cpus()))
        # stdout is the plan's alone (--json): what planning says on the way (a conversion, vLLM's
        # import when it splits the layers for pipeline parallelism) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            planned = plan_serving(model, experts, env, ctx.args, bandwidth, experts_type)
    except (ValueError, OSError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({**planned.plan.to_json(), "available_memory": planned.host.available_memory,
                               "gpu_usable_bytes": planned.gpu_usable_bytes, "dense_bytes": planned.dense_bytes},
                              indent=2))
        return
    print_plan(Console(width=None if sys.stdout.isatty() else 132), planned)


def print_plan(console: Console, planned) -> None:
    """The plan as a table of ranks, then what fits where and the decode bound."""
    from lvgg.doctor import human_size
    from lvgg.plan import describe_parts
    from lvgg.topology import format_cpulist

    p, gpus = planned.plan, planned.host.gpus
    par = p.parallel
    console.print(f"[bold]{p.model_type}[/], experts file {p.experts_file} ({human_size(p.file_bytes)}); "
                  f"tensor-parallel {par.tp_size}, pipeline {par.pp_size}"
                  + (", expert-parallel" if par.expert_parallel else "") + (", MTP draft" if par.mtp else ""))
    table = Table()
    columns = ["rank", "TP", "PP", "MoE layers", "share", "experts", "layout", "CPU engine"]
    columns += ["GPU layers: streamed / resident / split", "VRAM"] if gpus else []
    for col in columns:
        table.add_column(col, justify="right" if col in ("rank", "TP", "PP", "experts", "VRAM") else "left")
    for r in p.ranks:
        row = [str(r.index), str(r.tp_rank), str(r.pp_rank), format_cpulist(r.layers),
               r.by if par.tp_size > 1 else "whole", human_size(r.expert_bytes),
               ("repacked" if r.repack else "the file's") + (", the GPU reads it" if gpus and r.gpu_reads_packed else ""),
               describe_parts(r)]
        if gpus:
            g = r.gpu
            row += [f"{len(g.streamed)} / {len(g.resident)} / {len(g.split)}" if g else "no GPU",
                    human_size(g.vram_bytes) if g else ""]
        table.add_row(*row)
    console.print(table)
    available = planned.host.available_memory
    fits = available is None or p.host_bytes <= available
    console.print(f"host RAM for the experts: {human_size(p.host_bytes)}"
                  + (f" of {human_size(available)} available now" if available is not None else "")
                  + ("" if fits else " [bold red]: does not fit[/] (--no-repack keeps one copy; fewer layers per "
                     "machine with pipeline parallelism)"))
    for gpu, usable in zip(gpus, planned.gpu_usable_bytes or []):
        dense = "" if planned.dense_bytes is not None else " (the dense weights' size is unknown: not counted)"
        console.print(f"GPU {gpu.index} ({gpu.name}, {human_size(gpu.memory)}): vLLM may use {human_size(usable)} "
                      f"after the dense weights{dense}; lvgg's experts take their share of it, the KV cache the rest")
    if p.decode_bound == float("inf"):
        console.print("decode bound, one sequence: none from RAM (every layer's experts are resident on the GPU)")
    elif p.decode_bound is not None:
        console.print(f"decode bound, one sequence: {p.decode_bound:.1f} tok/s ({human_size(p.active_bytes_per_token)} "
                      f"of experts per token at {p.read_bandwidth:.1f} GB/s)")
    for note in p.notes:
        console.print(f"[yellow]note:[/] {note}")


@app.command()
def inspect(path: str = typer.Argument(..., help="any GGUF file, the first part of a split one, or org/repo:QUANT")
            ) -> None:
    """Layers, expert types and sizes, and source of a GGUF file."""
    from lvgg.inspect_gguf import inspect_gguf

    try:
        s = inspect_gguf(path)
    except (ValueError, OSError) as e:
        _fail(e)
    console = Console(width=None if sys.stdout.isatty() else 132)
    console.print(f"[bold]{s.path.name}[/]{f' (and {s.parts - 1} more parts)' if s.parts > 1 else ''}: "
                  f"architecture {s.architecture or '?'}, {len(s.layers)} MoE layers, "
                  f"{s.other_tensors} other tensors ({s.other_bytes / 2**20:.1f} MiB)")
    for key, value in s.metadata.items():
        if key != "general.architecture":
            console.print(f"  {key} = {value}")
    table = Table()
    for col in ("layer", "experts", "hidden", "intermediate", "types", "MiB"):
        table.add_column(col, justify="right")
    for L in s.layers:
        table.add_row(str(L.layer), str(L.n_experts), str(L.hidden_size), str(L.intermediate_size),
                      " ".join(f"{k}={v}" for k, v in L.types.items()), f"{L.nbytes / 2**20:.1f}")
    if s.layers:
        console.print(table)


@bench_app.command("moe")
def bench_moe(
    types: str = typer.Option("Q4_K,Q4_0,Q8_0,BF16",
                              help="ggml types of the experts (or Q4_K_M: Q4_K gate/up, Q6_K down), comma separated"),
    tokens: str = typer.Option("1,8,64,512,2048", help="token counts per call"),
    threads: int = typer.Option(0, help="engine threads (0: one per physical core)"),
    layers: int = typer.Option(3, help="distinct layers in the synthetic file (more: colder caches)"),
    seconds: float = typer.Option(1.0, help="minimum timed seconds per figure"),
    hidden: int = typer.Option(2048, help="hidden size of the synthetic layer"),
    intermediate: int = typer.Option(768, help="expert intermediate size of the synthetic layer"),
    experts: int = typer.Option(128, help="routed experts of the synthetic layer"),
    top_k: int = typer.Option(8, help="experts per token"),
    workdir: str = typer.Option(None, help="folder for the synthetic experts files (default: temp)"),
    configs: str = typer.Option(None, help="engine configurations to compare, ';' separated (default: all of "
                                "'ggml mul_mat_id;repacked;ggml repacked;per-expert;auto, both layouts', and "
                                "'repacked, AVX2 kernels' where the build has AVX-512 VNNI kernels too)"),
    file: str = typer.Option(None, help="time this file's expert layers instead of synthetic ones: an experts file, "
                             "a llama.cpp GGUF (split: its first part) or org/repo:QUANT (--top-k: its experts per "
                             "token)"),
) -> None:
    """CPU MoE layer (30B-A3B shapes by default): ms per layer, tokens/s and bandwidth use."""
    from lvgg import _bridge, bench

    configs = configs or ";".join(bench.default_configs())

    console = Console(width=None if sys.stdout.isatty() else 132)  # whole table in logs
    threads = threads or len(_bridge.physical_core_cpus())
    bw = bench.read_bandwidth_gb_per_s(threads)
    console.print(f"read bandwidth, {threads} threads: [bold]{bw:.1f} GB/s[/] (the floor at 1 token)")
    try:
        progress = Console(stderr=True)  # what is being done, as the table comes at the end
        results = bench.bench_moe(_csv(types), _csv(tokens, int), threads, layers, seconds, workdir,
                                  tuple(c.strip() for c in configs.split(";") if c.strip()), file,
                                  lambda text: progress.print(f"[dim]{text}[/]"),
                                  n_experts=experts, hidden=hidden, intermediate=intermediate, top_k=top_k)
    except (ValueError, OSError) as e:
        _fail(e)
    shape = f"layers of {file}" if file else f"MoE layer D={hidden} F={intermediate} E={experts}"
    print_moe_table(console, results, bw, f"{shape} top-{top_k}, {threads} threads")


class Kernels(str, Enum):
    lvgg = "lvgg"
    ggml = "ggml"


@bench_app.command("nodes")
def bench_nodes(
    types: str = typer.Option("Q4_K,BF16", help="ggml types of the experts, comma separated"),
    tokens: str = typer.Option("1,8,64,512", help="token counts per call"),
    nodes: str = typer.Option("1,2,4", help="virtual node counts: the cores split into this many pinned groups"),
    threads: int = typer.Option(0, help="cores used in all (0: every physical core)"),
    layers: int = typer.Option(3, help="distinct layers in the synthetic file"),
    seconds: float = typer.Option(1.0, help="minimum timed seconds per figure"),
    workdir: str = typer.Option(None, help="folder for the synthetic experts files (default: temp)"),
    kernels: Kernels = typer.Option(Kernels.lvgg, help="lvgg: its own kernels where the CPU has AVX-512 VNNI; ggml: "
                                    "ggml's for every type"),
) -> None:
    """The cost of splitting experts over NUMA nodes, measured with virtual nodes on this socket."""
    from lvgg import _bridge, bench

    console = Console(width=None if sys.stdout.isatty() else 132)
    threads = threads or len(_bridge.physical_core_cpus())
    counts = [n for n in _csv(nodes, int) if n <= threads]  # a virtual node needs a core of its own
    if not counts:
        _fail(ValueError(f"--nodes {nodes}: every count is above the {threads} cores used; give 1..{threads}"))
    if len(counts) < len(_csv(nodes, int)):
        console.print(f"[yellow]{threads} cores: node counts above that are left out[/]")
    bw = bench.read_bandwidth_gb_per_s(threads)
    console.print(f"read bandwidth, {threads} threads: [bold]{bw:.1f} GB/s[/]")
    results = bench.bench_nodes(_csv(types), _csv(tokens, int), threads, counts, layers, seconds, workdir,
                                own_kernels=kernels is Kernels.lvgg)
    print_moe_table(console, results, bw, f"30B-A3B MoE layer, {threads} cores split into virtual nodes, "
                    f"{kernels.value}'s kernels")


@bench_app.command("ranks")
def bench_ranks(
    types: str = typer.Option("Q4_K_M,Q8_0", help="ggml types of the experts (or Q4_K_M), comma separated"),
    tokens: str = typer.Option("1,8,64,512", help="token counts per call"),
    ranks: int = typer.Option(2, help="tensor- or expert-parallel ranks sharing the cores"),
    threads: int = typer.Option(0, help="cores used in all (0: every physical core)"),
    layers: int = typer.Option(3, help="distinct layers in the synthetic file"),
    seconds: float = typer.Option(1.0, help="minimum timed seconds per figure"),
    hidden: int = typer.Option(2048, help="hidden size of the synthetic layer"),
    intermediate: int = typer.Option(768, help="expert intermediate size of the synthetic layer"),
    experts: int = typer.Option(128, help="routed experts of the synthetic layer"),
    top_k: int = typer.Option(8, help="experts per token"),
    workdir: str = typer.Option(None, help="folder for the synthetic experts files (default: temp)"),
    kernels: Kernels = typer.Option(Kernels.lvgg, help="lvgg: its own kernels where the CPU has AVX-512 VNNI; ggml: "
                                    "ggml's for every type"),
) -> None:
    """Ranks of one machine (tensor or expert parallel) against one engine: each rank computes its
    part of the experts on its share of the cores, all at once; a call waits for the slowest."""
    from lvgg import _bridge, bench

    console = Console(width=None if sys.stdout.isatty() else 132)
    threads = threads or len(_bridge.physical_core_cpus())
    if not 2 <= ranks <= threads:
        _fail(ValueError(f"--ranks {ranks}: give 2..{threads} (each rank needs a core of its own)"))
    bw = bench.read_bandwidth_gb_per_s(threads)
    console.print(f"read bandwidth, {threads} threads: [bold]{bw:.1f} GB/s[/]")
    results = bench.bench_ranks(_csv(types), _csv(tokens, int), threads, ranks, layers, seconds, workdir,
                                own_kernels=kernels is Kernels.lvgg, n_experts=experts, hidden=hidden,
                                intermediate=intermediate, top_k=top_k)
    print_moe_table(console, results, bw, f"MoE layer D={hidden} F={intermediate} E={experts} top-{top_k}, "
                    f"{threads} cores: one engine or {ranks} ranks (rows: vLLM's share of every expert; blocks: "
                    f"whole blocks of down, cores by bytes; experts: whole experts), {kernels.value}'s kernels")


def print_moe_table(console: Console, results: list, bw: float, title: str) -> None:
    table = Table(title=title)
    for col in ("type", "engine", "tokens", "ms/layer", "tok/s (48 layers)", "active GB/s", "% of read bw"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(r.qtype, r.config, str(r.tokens), f"{r.ms_per_layer:.3f}", f"{r.model_tokens_per_s:.1f}",
                      f"{r.active_gb_per_s:.1f}" if r.tokens == 1 else "",
                      f"{100 * r.active_gb_per_s / bw:.0f}%" if r.tokens == 1 else "")
    console.print(table)


if __name__ == "__main__":
    app()
