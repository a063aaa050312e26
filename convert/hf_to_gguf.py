"""Hugging Face checkpoint -> experts file: every routed expert, quantized with ggml's quantizer."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from .experts_writer import CONVERTER_VERSION, PlannedTensor, layer_types_metadata, write_experts_gguf
from .hf_source import Checkpoint, read_config, resolve_source
from .output_types import check_row_length
from lvgg.models import PROJECTIONS, ExpertSpec, MoEArch, arch_for, gguf_expert_bias_name, gguf_expert_name
from lvgg.quantize import quantize

Q = gguf.GGMLQuantizationType
DEFAULT_TYPE = Q.Q4_K  # of every projection, where the command names none (MXFP4 experts stay MXFP4)


def _fused_parts(layout: str, F: int) -> tuple[tuple[str, str, slice], ...]:
    """A fused checkpoint's projections: (projection, its fused tensor, its rows there)."""
    gate, up = (slice(0, None, 2), slice(1, None, 2)) if layout == "interleaved" else (slice(0, F), slice(F, 2 * F))
    return ("gate", "gate_up", gate), ("up", "gate_up", up), ("down", "down", slice(None))


def expert_hyperparameters(gguf_arch: str, spec: ExpertSpec, n_layers: int) -> dict[str, int]:
    """The model-shape keys llama.cpp uses, so the plugin can check a file against a model."""
    return {f"{gguf_arch}.block_count": n_layers, f"{gguf_arch}.embedding_length": spec.hidden_size,
            f"{gguf_arch}.expert_count": spec.n_experts, f"{gguf_arch}.expert_used_count": spec.top_k,
            f"{gguf_arch}.expert_feed_forward_length": spec.intermediate_size}


def convert_hf(src: str, out: Path, types: dict[str, gguf.GGMLQuantizationType] | None, threads: int,
               quiet: bool = False) -> Path:
    """``types``: per projection; None: DEFAULT_TYPE, or MXFP4 for a checkpoint whose experts are MXFP4."""
    folder, revision = resolve_source(src)
    config = read_config(folder)
    arch = arch_for(config.get("model_type", "?"))
    spec = arch.spec(config)
    ckpt = Checkpoint(folder, config)
    if arch.fused_checkpoint:
        planned = [t for layer in spec.layers for t in _plan_fused_layer(ckpt, arch, spec, layer, types, threads)]
        source_format = "mxfp4" if _mxfp4(ckpt, arch, spec.layers[0]) else \
            ckpt.format_of(arch.hf_fused_name(spec.layers[0], "down"))
    else:
        planned = [_plan_projection(ckpt, arch, spec, layer, proj, (types or {}).get(proj, DEFAULT_TYPE), threads)
                   for layer in spec.layers for proj in PROJECTIONS]
        source_format = ckpt.format_of(arch.hf_expert_name(spec.layers[0], 0, "up")) if spec.layers else "none"
    metadata = {
        "general.name": folder.name if Path(src).is_dir() else src,
        "lvgg.source_model": src,
        "lvgg.source_revision": revision,
        "lvgg.source_format": f"safetensors-{source_format}",
        "lvgg.architecture": arch.model_type,
        "lvgg.converter_version": CONVERTER_VERSION,
        "lvgg.layer_types": layer_types_metadata(planned),
        **expert_hyperparameters(arch.gguf_arch, spec, int(config["num_hidden_layers"])),
    }
    return write_experts_gguf(out, arch.gguf_arch, metadata, planned, quiet)


def _plan_projection(ckpt: Checkpoint, arch: MoEArch, spec: ExpertSpec, layer: int, proj: str,
                     qtype: gguf.GGMLQuantizationType, threads: int) -> PlannedTensor:
    """One projection of a layer whose experts the checkpoint holds one tensor each."""
    rows, cols = spec.hf_shape(proj)
    check_row_length(qtype, cols, f"{proj} projection of layer {layer}")
    names = [arch.hf_expert_name(layer, e, proj) for e in range(spec.n_experts)]
    read = sum(ckpt.check(n, (rows, cols)) for n in names)

    def produce() -> np.ndarray:
        stacked = np.empty((len(names), rows, cols), dtype=np.float32)
        for e, n in enumerate(names):
            stacked[e] = ckpt.load_f32(n)
        ckpt.release()  # one projection of one layer in memory at a time
        return quantize(stacked, qtype, threads)

    return PlannedTensor(gguf_expert_name(layer, proj), qtype, (spec.n_experts, rows, cols), produce, read)


def _mxfp4(ckpt: Checkpoint, arch: MoEArch, layer: int) -> bool:
    return arch.hf_fused_name(layer, "down") + "_blocks" in ckpt.tensors


def _plan_fused_layer(ckpt: Checkpoint, arch: MoEArch, spec: ExpertSpec, layer: int,
                      types: dict[str, gguf.GGMLQuantizationType] | None, threads: int) -> list[PlannedTensor]:
    """A layer whose experts the checkpoint holds as one tensor per projection (gpt-oss, Llama-4):
    gate_up [E, D, 2F] (gate and up columns as arch.fused_checkpoint says) and down [E, F, D],
    applied as x @ W, or, MXFP4, their _blocks [E, out, in/32, 16] and _scales [E, out, in/32]
    (rows as the columns), each with a _bias where arch.biased. MXFP4 kept as MXFP4 is copied
    block by block."""
    E, D, F = spec.n_experts, spec.hidden_size, spec.intermediate_size
    mxfp4 = _mxfp4(ckpt, arch, layer)
    types = types or {p: Q.MXFP4 if mxfp4 else DEFAULT_TYPE for p in PROJECTIONS}
    # per fused tensor: (HF shape of its float form, [out, in] of one expert's rows)
    fused = {"gate_up": ((E, D, 2 * F), (2 * F, D)), "down": ((E, F, D), (D, F))}
    loaded: dict[str, np.ndarray] = {}  # one fused tensor of the layer at a time, as float or MXFP4 bytes
    planned, read = [], {}
    for name, (hf_shape, (out, cols)) in fused.items():
        base = arch.hf_fused_name(layer, name)
        if mxfp4:
            read[name] = _check_mxfp4(ckpt, base, (E, out, cols))
        else:
            read[name] = ckpt.check(base, hf_shape)
        if arch.biased:
            ckpt.check(base + "_bias", (E, out))

    def rows_of(name: str, half: slice) -> np.ndarray:
        """One projection's rows from the layer's fused tensor ([E, rows, cols] float, or MXFP4 bytes)."""
        if name not in loaded:
            loaded.clear()
            base = arch.hf_fused_name(layer, name)
            if mxfp4:
                loaded[name] = _ggml_mxfp4(ckpt.load_raw(base + "_blocks"), ckpt.load_raw(base + "_scales"))
            else:
                loaded[name] = ckpt.load_f32(base).transpose(0, 2, 1)  # [E, out, in]
            ckpt.release()
        return loaded[name][:, half]

    parts = _fused_parts(arch.fused_checkpoint, F)
    for proj, name, half in parts:
        rows, cols = (D, F) if proj == "down" else (F, D)
        qtype = types[proj]
        check_row_length(qtype, cols, f"{proj} projection of layer {layer}")

        def produce(name=name, half=half, qtype=qtype, rows=rows, cols=cols) -> np.ndarray:
            w = rows_of(name, half)
            if mxfp4 and qtype == Q.MXFP4:
                return np.ascontiguousarray(w)  # the checkpoint's blocks, as ggml lays them out
            if mxfp4:
                w = gguf.quants.dequantize(np.ascontiguousarray(w), Q.MXFP4).reshape(E, rows, cols)
            return quantize(np.ascontiguousarray(w, dtype=np.float32), qtype, threads)

        planned.append(PlannedTensor(gguf_expert_name(layer, proj), qtype, (E, rows, cols), produce,
                                     read[name] // (2 if name == "gate_up" else 1)))
    for proj, name, half in parts if arch.biased else ():
        width = D if proj == "down" else F

        def bias(name=name, half=half) -> np.ndarray:
            return np.ascontiguousarray(ckpt.load_f32(arch.hf_fused_name(layer, name) + "_bias")[:, half])

        planned.append(PlannedTensor(gguf_expert_bias_name(layer, proj), Q.F32, (E, width), bias, E * width * 4))
    return planned


def _check_mxfp4(ckpt: Checkpoint, base: str, shape: tuple[int, int, int]) -> int:
    """Validate an MXFP4 weight's _blocks and _scales for [experts, rows, cols]; its bytes."""
    E, rows, cols = shape
    if cols % 32:
        raise ValueError(f"{base}: rows of {cols} values are not whole MXFP4 blocks of 32")
    for suffix, want in (("_blocks", (E, rows, cols // 32, 16)), ("_scales", (E, rows, cols // 32))):
        info = ckpt.tensors.get(base + suffix)
        if info is None:
            raise ValueError(f"the checkpoint has no tensor {base + suffix!r} (MXFP4 experts have _blocks and _scales)")
        if info.shape != want or info.dtype != "U8":
            raise ValueError(f"tensor {base + suffix!r} is {info.dtype} {list(info.shape)}, expected U8 {list(want)}")
    return E * rows * cols // 32 * 17


def _ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 as the checkpoint holds it (per block of 32: 16 bytes, values 2j and 2j+1 in the low
    and high nibble of byte j; an E8M0 scale apart) -> ggml's block_mxfp4 bytes (the scale, then
    16 bytes holding values j and j+16 in the low and high nibble of byte j): [..., blocks * 17]."""
    values = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = values[..., :16] | (values[..., 16:] << 4)
    return np.concatenate([scales[..., None], packed], axis=-1).reshape(*scales.shape[:-1], -1)
