"""Write experts files (GGUF) from float weights, and read them back as f64 references.

Quantization goes through ggml's own quantizer (the bridge), so every ggml type can be
written; the reference side dequantizes with gguf-py, which decodes every type independently
of ggml. Shapes follow numpy order: gate/up [E, F, D], down [E, D, F].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from lvgg.models import gguf_expert_bias_name, gguf_expert_name as tensor_name
from lvgg.quantize import add_quantized_tensor, quantize, write_all
from lvgg.testing.llama_cpp import NEEDS_IMATRIX

PROJECTIONS = ("gate", "up", "gate_up", "down")
BIASES = ("gate", "up", "down")  # llama.cpp's blk.N.ffn_{gate,up,down}_exps.bias (gpt-oss)


def write_experts_file(path: str | os.PathLike[str], layers: dict[int, dict[str, np.ndarray]],
                       types: gguf.GGMLQuantizationType | dict[str, gguf.GGMLQuantizationType],
                       architecture: str = "qwen3moe", threads: int = 1) -> Path:
    """Write `layers` ({layer: {proj: float array, and "<proj>_bias": [E, rows] where biased}}) quantized
    as `types` (one, or per projection); biases stay f32, as llama.cpp writes them."""
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture)
    for layer, tensors in sorted(layers.items()):
        for proj in PROJECTIONS:
            if proj in tensors:
                qtype = types[proj] if isinstance(types, dict) else types
                # a flat importance matrix where ggml's quantizer needs one (IQ1_S, IQ2_XXS, IQ2_XS, ...)
                imatrix = np.ones(tensors[proj].shape[-1], np.float32) if qtype.name in NEEDS_IMATRIX else None
                add_quantized_tensor(writer, tensor_name(layer, proj),
                                     quantize(tensors[proj], qtype, threads, imatrix), qtype)
        for proj in BIASES:
            if f"{proj}_bias" in tensors:
                bias = np.ascontiguousarray(tensors[f"{proj}_bias"], np.float32)
                writer.add_tensor(gguf_expert_bias_name(layer, proj), bias)
    write_all(writer)
    return path


def random_experts(rng: np.random.Generator, n_experts: int, hidden: int, intermediate: int,
                   form: str = "gate+up+down", biased: bool = False) -> dict[str, np.ndarray]:
    """Random expert weights with the scale of a trained layer (outputs of order 1); with
    `biased`, a bias per expert and projection (gate and up: also an ungated layer's up) too."""
    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    if form == "gate+up+down":
        out = {"gate": w(n_experts, intermediate, hidden), "up": w(n_experts, intermediate, hidden),
               "down": w(n_experts, hidden, intermediate)}
    elif form == "gate_up+down":
        out = {"gate_up": w(n_experts, 2 * intermediate, hidden), "down": w(n_experts, hidden, intermediate)}
    elif form == "up+down":
        out = {"up": w(n_experts, intermediate, hidden), "down": w(n_experts, hidden, intermediate)}
    else:
        raise ValueError(f"unknown expert form {form!r}")
    if biased:
        for proj in ("up", "down") if form == "up+down" else BIASES:
            rows = hidden if proj == "down" else intermediate
            out[f"{proj}_bias"] = (0.5 * rng.standard_normal((n_experts, rows))).astype(np.float32)
    return out


@dataclass
class ReferenceLayer:
    """One layer's experts dequantized by gguf-py to float64."""

    gate: np.ndarray | None  # [E, F, D]
    up: np.ndarray  # [E, F, D]
    down: np.ndarray  # [E, D, F]
    biases: dict[str, np.ndarray] | None = None  # gate/up [E, F], down [E, D] (f32 in the file)

    def forward(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, activation: str = "silu") -> np.ndarray:
        """f64 MoE output for x [T, D], ids [T, K] (-1: no expert), weights [T, K]."""
        x = np.asarray(x, dtype=np.float64)
        out = np.zeros((x.shape[0], self.down.shape[1]))
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                if e < 0:
                    continue
                b = {p: v[e] for p, v in self.biases.items()} if self.biases else {}
                u = self.up[e] @ x[t] + b.get("up", 0.0)
                if self.gate is None:
                    h = np.maximum(u, 0.0) ** 2
                else:
                    g = self.gate[e] @ x[t] + b.get("gate", 0.0)
                    if activation == "silu":
                        h = g / (1.0 + np.exp(-g)) * u
                    elif activation == "swigluoai":  # gpt-oss: clamped at 7, sigmoid(1.702 g), up + 1
                        g, u = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
                        h = g / (1.0 + np.exp(-1.702 * g)) * (u + 1.0)
                    elif activation == "swiglustep":  # Step-3.5: silu(g) clamped above at 7, up to [-7, 7]
                        h = np.minimum(g / (1.0 + np.exp(-g)), 7.0) * np.clip(u, -7.0, 7.0)
                    else:  # GELU, tanh form (as ggml computes it)
                        h = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3))) * u
                out[t] += float(weights[t, k]) * (self.down[e] @ h + b.get("down", 0.0))
        return out


def read_reference(path: str | os.PathLike[str], layer: int) -> ReferenceLayer:
    """Dequantize one layer's experts from the file with gguf-py (independent of ggml)."""
    reader = gguf.GGUFReader(str(path))
    found, biases = {}, {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        for proj in PROJECTIONS:
            if t.name == tensor_name(layer, proj):
                found[proj] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
            if t.name == gguf_expert_bias_name(layer, proj):
                biases[proj] = np.asarray(t.data, np.float64).reshape(shape)
    if "gate_up" in found:
        f = found["gate_up"].shape[1] // 2
        return ReferenceLayer(found["gate_up"][:, :f], found["gate_up"][:, f:], found["down"], biases or None)
    return ReferenceLayer(found.get("gate"), found["up"], found["down"], biases or None)


def write_llamacpp_gguf(path: str | os.PathLike[str], rng: np.random.Generator, split_max_tensors: int = 0,
                        n_layers: int = 2) -> Path:
    """A llama.cpp-style model file (gguf-py's writer, llama.cpp's split.* keys when split): an
    attention tensor and Q4_K/Q4_K/Q6_K experts (8 x 256 x 256) per layer. With
    ``split_max_tensors``, parts <stem>-0000i-of-0000n.gguf of that many tensors each."""
    w = gguf.GGUFWriter(str(path), "qwen3moe", split_max_tensors=split_max_tensors)
    w.add_uint32("qwen3moe.expert_count", 8)
    w.add_uint32("qwen3moe.block_count", n_layers)
    for layer in range(n_layers):
        w.add_tensor(f"blk.{layer}.attn_q.weight", rng.standard_normal((256, 256)).astype(np.float32))
        for proj, qtype, shape in (("gate", gguf.GGMLQuantizationType.Q4_K, (8, 256, 256)),
                                   ("up", gguf.GGMLQuantizationType.Q4_K, (8, 256, 256)),
                                   ("down", gguf.GGMLQuantizationType.Q6_K, (8, 256, 256))):
            add_quantized_tensor(w, tensor_name(layer, proj),
                                 quantize(rng.standard_normal(shape).astype(np.float32) / 16, qtype), qtype)
    write_all(w)
    return Path(path)
