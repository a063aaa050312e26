"""Fuzz ExpertStore with damaged GGUF files: every case must load or raise a Python error.

A crash (a GGML_ASSERT abort, a segfault) kills this process; the last case printed names
the damage. Run longer than the test suite does:  python tests/fuzz_gguf.py --cases 20000
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from gguf import GGMLQuantizationType as Q

import lvgg
from lvgg.testing.expert_files import random_experts, write_experts_file

EXPECTED = (ValueError, OSError, IndexError, TypeError)


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    b = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:
        cut = int(rng.integers(0, len(b)))
        return f"truncate at {cut}", bytes(b[:cut])
    if kind == 1:  # flip bytes in the header and tensor infos
        head = min(len(b), 4096)
        spots = rng.integers(0, head, size=int(rng.integers(1, 8)))
        for s in spots:
            b[s] = int(rng.integers(0, 256))
        return f"bytes {sorted(spots.tolist())} randomized", bytes(b)
    if kind == 2:  # an absurd little-endian integer anywhere in the first 4 KiB
        at = int(rng.integers(0, min(len(b), 4096) - 8))
        choices = [2**63 - 1, 2**64 - 1, 2**32, 2**31 - 1, 0, 1 << 40]
        value = choices[int(rng.integers(0, len(choices)))]
        b[at:at + 8] = value.to_bytes(8, "little")
        return f"u64 {value} at {at}", bytes(b)
    if kind == 3:
        at = int(rng.integers(0, len(b)))
        return f"{int(rng.integers(1, 4096))} random bytes inserted at {at}", bytes(
            b[:at] + rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes() + b[at:])
    return "magic changed", b"GGUG" + bytes(b[4:])


def run(cases: int, seed: int, workdir: str) -> int:
    rng = np.random.default_rng(seed)
    src = write_experts_file(os.path.join(workdir, "valid.gguf"),
                             {0: random_experts(rng, 4, 256, 256), 1: random_experts(rng, 4, 256, 256)},
                             {"gate": Q.Q4_K, "up": Q.Q4_K, "down": Q.Q6_K})
    data = src.read_bytes()
    bad = os.path.join(workdir, "damaged.gguf")
    ids = np.array([[0, 1], [2, 3]], np.int32)
    w = np.ones((2, 2), np.float32)
    unexpected = 0
    for case in range(cases):
        what, damaged = mutate(data, rng)
        print(f"case {case}: {what}", file=sys.stderr, flush=True)
        with open(bad, "wb") as f:
            f.write(damaged)
        try:
            store = lvgg.ExpertStore(bad)
            moe = lvgg.CpuMoE(store, threads=1, max_tokens=2)
            for layer in store.layers:
                moe(layer, np.ones((2, store.layer_info(layer).hidden_size), np.float32), ids, w)
        except EXPECTED:
            pass
        except Exception as e:  # noqa: BLE001 - any other exception type is a finding
            unexpected += 1
            print(f"UNEXPECTED {type(e).__name__}: {e}", flush=True)
    return unexpected


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        n = run(args.cases, args.seed, d)
    print(f"{args.cases} cases, {n} unexpected exceptions")
    sys.exit(1 if n else 0)


if __name__ == "__main__":
    main()
