"""The plugin's settings, read from the environment (set by `lvgg serve` flags and
`lvgg.LLM` arguments, or by hand); the GPU ones are checked before vLLM starts.

    LVGG_CPU_THREADS             engine threads: a total ("15"; with several NUMA nodes shared
                                 evenly) or one count per node ("7,8")
    LVGG_CPU_BINDING             "node" (default: a node's threads float over its CPUs) or
                                 "core" (one thread pinned per CPU)
    LVGG_CPU_KERNELS             "lvgg" (default) or "ggml": whose CPU kernels run Q2_K-Q6_K,
                                 IQ4_XS, IQ4_NL, MXFP4, Q8_0 and Q4_0 (AVX-512 VNNI or AVX2),
                                 IQ2_XXS-IQ3_S (AVX-512 VNNI with VBMI)
    LVGG_REPACK                  "on": the CPU runs from a re-laid-out copy of the experts
                                 where its kernels are faster (a GPU next to it reads lvgg's
                                 packed copies too, else the file); "off": from the file's own
                                 bytes with ggml's kernels (slower decode; next to a GPU, which
                                 then reads the file, one copy of the experts in RAM); "auto"
                                 (default): on, unless the GPU would pin the file beside the
                                 copies and the memory available cannot hold both

    LVGG_GPU_PREFILL_MIN_TOKENS  passes of at least this many tokens stream the experts to the
                                 GPU (default 64; 0 or "off": never)
    LVGG_GPU_RESIDENT_LAYERS     layers whose experts stay on the GPU: "0-5,40" or "auto"
    LVGG_GPU_EXPERTS_GB          the most VRAM (GiB) lvgg's experts may take (default: no bound;
                                 with "auto", half of what vLLM may use after its weights)
    LVGG_GPU_DECODE_SPLIT        passes of up to 16 tokens (decode): N, the GPU fetches N/top_k
                                 of a step's distinct experts over the link (N of one token's,
                                 32 at most) and computes them while the CPU does the rest:
                                 "auto" (default: the fastest N per batch size, timed at
                                 startup; none where no split wins, and none with
                                 LVGG_REPACK off), N, or "off";
                                 docs/gpu-experts.md has what it gains
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from lvgg.topology import parse_ranges
from lvgg.vllm_plugin import (GPU_EXPERTS_GB_ENV, GPU_PREFILL_ENV, GPU_RESIDENT_ENV, GPU_SPLIT_ENV, REPACK_ENV,
                               THREADS_ENV)

BINDING_ENV = "LVGG_CPU_BINDING"
KERNELS_ENV = "LVGG_CPU_KERNELS"

DEFAULT_GPU_PREFILL_MIN_TOKENS = 64  # the CPU engine prefills ~130 tok/s; one streamed pass costs ~0.35 s
DEFAULT_GPU_DECODE_SPLIT = "auto"  # timed at startup, kept where it wins (docs/gpu-experts.md)


@dataclass(frozen=True)
class GpuSettings:
    prefill_min_tokens: int | None  # None: never stream
    resident: tuple[int, ...] | str  # layer indices, or "auto"
    experts_bytes: int | None  # VRAM bound, None: none given
    # GPU experts per token in decode steps, "auto", None: off
    decode_split: int | str | None = DEFAULT_GPU_DECODE_SPLIT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GpuSettings:
        env = os.environ if environ is None else environ
        return cls.parse(env.get(GPU_PREFILL_ENV, ""), env.get(GPU_RESIDENT_ENV, ""), env.get(GPU_EXPERTS_GB_ENV, ""),
                         env.get(GPU_SPLIT_ENV, ""))

    @classmethod
    def parse(cls, prefill_min_tokens: str, resident_layers: str, experts_gb: str,
              decode_split: str = "") -> GpuSettings:
        """The settings these texts (as the environment variables hold them) give, or ValueError."""
        return cls(_min_tokens(prefill_min_tokens), _resident(resident_layers), _gib(experts_gb),
                   _split(decode_split))


def _min_tokens(text: str) -> int | None:
    text = text.strip().lower()
    if not text:
        return DEFAULT_GPU_PREFILL_MIN_TOKENS
    if text == "off":
        return None
    return _non_negative(text, GPU_PREFILL_ENV, int, "a token count or 'off'") or None


def _resident(text: str) -> tuple[int, ...] | str:
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    return parse_ranges(text, GPU_RESIDENT_ENV, item="layer", largest=100_000)


def _split(text: str) -> int | str | None:
    text = text.strip().lower() or DEFAULT_GPU_DECODE_SPLIT
    if text == "auto":
        return "auto"
    if text == "off":
        return None
    return _non_negative(text, GPU_SPLIT_ENV, int, "'auto', 'off' or N, the GPU's share of the experts "
                         "in N/top_k") or None


def check_decode_split(slots: int | str | None, top_k: int) -> None:
    """Raise ValueError unless the GPU's share (``slots``/``top_k``) leaves the CPU a part."""
    if isinstance(slots, int) and slots >= top_k:
        raise ValueError(f"{GPU_SPLIT_ENV}={slots}: a token has {top_k} experts and the CPU keeps at least one; "
                         f"give 1..{top_k - 1}, 'auto' or 'off'")


def _gib(text: str) -> int | None:
    text = text.strip()
    return int(_non_negative(text, GPU_EXPERTS_GB_ENV, float, "a size in GiB") * 2**30) if text else None


def _non_negative(text: str, env: str, convert, what: str):
    """``convert(text)``, or ValueError naming ``env`` and what it takes."""
    try:
        value = convert(text)
    except ValueError:
        raise ValueError(f"{env} must be {what}, found {text!r}") from None
    if value < 0:
        raise ValueError(f"{env} must be >= 0, found {text!r}")
    return value


@dataclass(frozen=True)
class CpuSettings:
    threads: tuple[int, ...] = ()  # LVGG_CPU_THREADS: () the default, one total, or one count per node
    strict_binding: bool = False  # LVGG_CPU_BINDING=core: one thread pinned per CPU
    own_kernels: bool = True  # LVGG_CPU_KERNELS=lvgg: lvgg's kernels for the types its kernel set runs
    repack: str = "auto"  # LVGG_REPACK: "auto", "on" or "off"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CpuSettings:
        """The settings ``environ`` (default: the process's environment) holds, or ValueError naming
        the variable that is wrong."""
        env = os.environ if environ is None else environ
        return cls(_thread_counts(env.get(THREADS_ENV, "")), _choice(env, BINDING_ENV, ("node", "core")) == "core",
                   _choice(env, KERNELS_ENV, ("lvgg", "ggml")) == "lvgg",
                   _choice(env, REPACK_ENV, ("auto", "on", "off")))

    def threads_per_node(self, n_nodes: int) -> list[int] | None:
        """LVGG_CPU_THREADS as one count per node (None: each node's default)."""
        if not self.threads:
            return None
        if len(self.threads) == 1:
            total = self.threads[0]
            if total < n_nodes:
                raise ValueError(f"{THREADS_ENV}={total} is fewer than the {n_nodes} NUMA nodes lvgg uses (one thread "
                                 f"each at least); give more or set LVGG_NUMA=off")
            return [total // n_nodes + (i < total % n_nodes) for i in range(n_nodes)]
        if len(self.threads) != n_nodes:
            raise ValueError(f"{THREADS_ENV} gives {len(self.threads)} counts but lvgg uses {n_nodes} NUMA nodes "
                             "(LVGG_NUMA); give one count per node, or one total")
        return list(self.threads)


def _thread_counts(text: str) -> tuple[int, ...]:
    text = text.strip()
    if not text or text == "0":
        return ()
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a thread count or one count per NUMA node (e.g. 7,8), "
                         f"found {text!r}") from None
    if any(c < 1 for c in counts):
        raise ValueError(f"{THREADS_ENV}: thread counts must be >= 1, found {text!r}")
    return counts


def _choice(environ: Mapping[str, str], env: str, choices: tuple[str, ...]) -> str:
    """The value of ``env`` in lower case, one of ``choices`` (unset or empty: the first)."""
    text = environ.get(env, "").strip().lower() or choices[0]
    if text not in choices:
        names = [repr(c) for c in choices]
        raise ValueError(f"{env} must be {', '.join(names[:-1])} or {names[-1]}, found {text!r}")
    return text
