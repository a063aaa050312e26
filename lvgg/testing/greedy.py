"""Comparing two greedy runs of one model (the JSON that tests/vllm_generate.py prints)."""
from __future__ import annotations

from typing import Any

import numpy as np


def agreement(hybrid: dict[str, Any], stock: dict[str, Any], what: str) -> tuple[float, float, float]:
    """Share of greedy tokens equal to stock vLLM's; the largest log-probability difference up to
    the first divergence of each prompt; and, where a prompt diverges, stock's margin between its
    top two tokens there (a divergence is harmless when that margin is within the difference)."""
    same = float(np.mean([a == b for ha, sa in zip(hybrid["tokens"], stock["tokens"]) for a, b in zip(ha, sa)]))
    diffs, margins = [0.0], [0.0]
    for ht, st, hl, sl, sg in zip(hybrid["tokens"], stock["tokens"], hybrid["logprobs"], stock["logprobs"],
                                  stock["gaps"]):
        for a, b, la, lb, g in zip(ht, st, hl, sl, sg):
            if a != b:
                margins.append(g)
                break
            diffs.append(abs(la - lb))
    print(f"{what}: {same:.0%} of greedy tokens agree with stock vLLM; max logprob difference before "
          f"divergence {max(diffs):.3f}; stock's top-2 margin at divergences <= {max(margins):.3f}")
    return same, max(diffs), max(margins)
