"""Experts files made from Hugging Face models on first use, kept in lvgg's cache.

    lvgg serve Qwen/Qwen3-30B-A3B                  # no --experts: converted once, then reused

The file is keyed by the model, the revision the Hugging Face cache resolves (a download, or
what the cache holds under HF_HUB_OFFLINE) and the expert types:
``$LVGG_CACHE/experts/<org>--<name>/<revision>/<types>.gguf`` (LVGG_CACHE defaults to
``$XDG_CACHE_HOME/lvgg``, else ``~/.cache/lvgg``). The converter writes it under a temporary name
first, so an interrupted conversion leaves nothing that would be reused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CACHE_ENV = "LVGG_CACHE"
# --experts-type: the default, Q4_K gate and up with Q6_K down (llama.cpp's Q4_K_M for experts), or
# the checkpoint's own MXFP4 experts (gpt-oss) as they are
DEFAULT_EXPERTS_TYPE = "Q4_K_M"
NAMED_MIXES = {"Q4_K_M": "Q4_K:down=Q6_K", "Q5_K_M": "Q5_K:down=Q6_K"}


def cache_dir() -> Path:
    """lvgg's cache: $LVGG_CACHE, else $XDG_CACHE_HOME/lvgg, else ~/.cache/lvgg."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lvgg"


def is_hub_id(model: str) -> bool:
    """Whether ``model`` names a Hugging Face model (org/name) rather than a local folder."""
    return not Path(model).expanduser().exists() and model.count("/") == 1 and not model.startswith((".", "/", "~"))


def parse_experts_type(text: str) -> dict[str, Any]:
    """--experts-type: one type (Q8_0), a named mix (Q4_K_M: Q4_K, down Q6_K) or a default with
    per-projection types (Q4_K:down=Q6_K) -> {projection: ggml type}."""
    from lvgg.convert.output_types import projection_types

    default, _, per_projection = NAMED_MIXES.get(text.upper(), text).partition(":")
    return projection_types(default, per_projection or None)


def experts_for(model: str, experts_type: str | None = None, threads: int | None = None, quiet: bool = False) -> Path:
    """The experts file of Hub model ``model`` in ``experts_type`` (default: Q4_K_M, or the
    checkpoint's MXFP4 experts as they are): the cached one, else converted now (downloading the
    checkpoint unless HF_HUB_OFFLINE is set, with the converter's progress bar)."""
    from lvgg import _bridge
    from lvgg.convert.hf_source import read_config, resolve_source
    from lvgg.convert.hf_to_gguf import convert_hf

    folder, revision = resolve_source(model)  # FileNotFoundError, offline or not, says what is missing
    shipped_mxfp4 = (read_config(folder).get("quantization_config") or {}).get("quant_method") == "mxfp4"
    if experts_type is None and shipped_mxfp4:
        types, key = None, "as-shipped"
    else:
        types = parse_experts_type(experts_type or DEFAULT_EXPERTS_TYPE)
        key = "-".join(f"{p}={t.name}" for p, t in types.items())
    out = cache_dir() / "experts" / model.replace("/", "--") / revision / f"{key}.gguf"
    if out.exists():
        if not quiet:
            print(f"lvgg: experts of {model} ({key}) from the cache: {out}")
        return out
    if not quiet:
        print(f"lvgg: converting the experts of {model} at {revision[:12]} ({key}) once, into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_hf(model, out, types, threads or len(_bridge.physical_core_cpus()), quiet)
