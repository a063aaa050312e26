"""The `lvgg` command line: thin commands over the library."""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from lvgg import bench

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
    console.print("CPU features:", " ".join(k for k, v in feats.items() if v) or "none")
    console.print("CPUs usable by this process:", len(_bridge.process_cpus()),
                  "| physical cores among them:", len(_bridge.physical_core_cpus()))


@bench_app.command("moe")
def bench_moe(
    types: str = typer.Option("Q4_K,Q4_0,Q8_0,BF16", help="ggml types of the experts, comma separated"),
    tokens: str = typer.Option("1,8,64,512,2048", help="token counts per call"),
    threads: int = typer.Option(0, help="engine threads (0: one per physical core)"),
    layers: int = typer.Option(3, help="distinct layers in the synthetic file (more: colder caches)"),
    seconds: float = typer.Option(1.0, help="minimum timed seconds per figure"),
    hidden: int = typer.Option(2048), intermediate: int = typer.Option(768),
    experts: int = typer.Option(128), top_k: int = typer.Option(8),
    workdir: str = typer.Option(None, help="folder for the synthetic experts files (default: temp)"),
    configs: str = typer.Option(";".join(bench.CONFIGS), help="engine configurations to compare, ';' separated"),
) -> None:
    """CPU MoE layer (30B-A3B shapes by default): ms per layer, tokens/s and bandwidth use."""
    from lvgg import _bridge

    console = Console(width=None if sys.stdout.isatty() else 132)  # whole table in logs
    threads = threads or len(_bridge.physical_core_cpus())
    bw = bench.read_bandwidth_gb_per_s(threads)
    console.print(f"read bandwidth, {threads} threads: [bold]{bw:.1f} GB/s[/] (the floor at 1 token)")
    results = bench.bench_moe(_csv(types), _csv(tokens, int), threads, layers, seconds, workdir,
                              tuple(c.strip() for c in configs.split(";") if c.strip()),
                              n_experts=experts, hidden=hidden, intermediate=intermediate, top_k=top_k)
    table = Table(title=f"MoE layer D={hidden} F={intermediate} E={experts} top-{top_k}, {threads} threads")
    for col in ("type", "engine", "tokens", "ms/layer", "tok/s (48 layers)", "active GB/s", "% of read bw"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(r.qtype, r.config, str(r.tokens), f"{r.ms_per_layer:.3f}", f"{r.model_tokens_per_s:.1f}",
                      f"{r.active_gb_per_s:.1f}" if r.tokens == 1 else "",
                      f"{100 * r.active_gb_per_s / bw:.0f}%" if r.tokens == 1 else "")
    console.print(table)


if __name__ == "__main__":
    app()
