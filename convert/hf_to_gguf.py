"""Hugging Face checkpoint -> experts file: every routed expert, quantized with ggml's quantizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .experts_writer import CONVERTER_VERSION, PlannedTensor, layer_types_metadata, write_experts_gguf
from .hf_source import Checkpoint, read_config, resolve_source
from .output_types import check_row_length
from lvgg.models import PROJECTIONS, ExpertSpec, MoEArch, gguf_expert_bias_name, gguf_expert_name, model_spec
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
    spec = model_spec(config)
    arch = spec.arch
    ckpt = Checkpoint(folder, config)
    prefix = _layers_prefix(ckpt, arch, spec)
    layouts = {layer: Layout.of(ckpt, arch, spec, prefix, layer) for layer in spec.layers}
    # next-token-prediction layers (vLLM's MTP draft): written where the checkpoint has their experts,
    # after the model's layers (blk.<n_layers + k>, as llama.cpp numbers them)
    for layer in spec.mtp_layers:
        where = spec.checkpoint_layer(layer, prefix)
        if any(name.startswith(where[0] + arch.experts_marker(where[1]) + ".") for name in ckpt.tensors):
            layouts[layer] = Layout.of(ckpt, arch, spec, *where)
    planned = []
    for layer, layout in layouts.items():
        if layout.fused:
            planned += _plan_fused_layer(ckpt, arch, spec, layer, layout, types, threads)
        else:
            planned += [_plan_projection(ckpt, arch, spec, layer, layout, proj, (types or {}).get(proj, DEFAULT_TYPE),
                                         threads) for proj in arch.projections]
    mtp = [layer for layer in layouts if layer >= spec.n_layers]
    metadata = {
        "general.name": folder.name if Path(src).is_dir() else src,
        "lvgg.source_model": src,
        "lvgg.source_revision": revision,
        "lvgg.source_format": f"safetensors-{layouts[spec.layers[0]].source_format(ckpt, arch)}"
        if spec.layers else "safetensors-none",
        "lvgg.architecture": arch.model_type,
        "lvgg.converter_version": CONVERTER_VERSION,
        "lvgg.layer_types": layer_types_metadata(planned),
        **expert_hyperparameters(arch.gguf_arch, spec, spec.n_layers),
        **({f"{arch.gguf_arch}.nextn_predict_layers": len(mtp)} if mtp else {}),  # llama.cpp's key
    }
    return write_experts_gguf(out, arch.gguf_arch, metadata, planned, quiet)


@dataclass(frozen=True)
class Layout:
    """How a checkpoint holds one layer's experts."""

    prefix: str  # of its layers' names: "model." for a causal LM; a multimodal checkpoint's text model's own
    hf_layer: int  # the layer's number in those names (an MTP module's own: mtp.layers.0)
    fused: bool  # one tensor per projection, gate_up_proj and down_proj, rather than one per expert
    mxfp4: bool  # fused, as MXFP4 _blocks and _scales (gpt-oss)
    in_major: bool  # fused float tensors as [E, in, out], applied as x @ W (gpt-oss, Llama-4, Hub Qwen3-VL),
    # rather than [E, out, in] (gemma-4, Qwen3.5)
    stacked: bool = False  # one [E, out, in] tensor per projection, gate, up and down (Step-3.5)

    @staticmethod
    def of(ckpt: Checkpoint, arch: MoEArch, spec: ExpertSpec, prefix: str, hf_layer: int) -> "Layout":
        if arch.stacked and arch.hf_stacked_name(hf_layer, "down", prefix) in ckpt.tensors:
            return Layout(prefix, hf_layer, False, False, False, stacked=True)
        down = arch.hf_fused_name(hf_layer, "down", prefix)
        mxfp4 = down + "_blocks" in ckpt.tensors
        if not mxfp4 and down not in ckpt.tensors:
            return Layout(prefix, hf_layer, False, False, False)
        D, F = spec.hidden_size, spec.intermediate_size
        in_major = False
        if not mxfp4:  # which way round, from the shapes (gate_up's tells unless 2F == D; down's then)
            gate_up = ckpt.tensors.get(arch.hf_fused_name(hf_layer, "gate_up", prefix))
            shapes = {True: ((D, 2 * F), (F, D)), False: ((2 * F, D), (D, F))}
            found = (gate_up.shape[1:] if gate_up else None, ckpt.tensors[down].shape[1:])
            fits = [major for major, want in shapes.items() if found[0] == want[0] and found[1] == want[1]]
            if not fits:
                raise ValueError(f"{down} and gate_up_proj have shapes {[list(s) if s else None for s in found]}; "
                                 f"expected per expert [{D}, {2 * F}] and [{F}, {D}] (or both transposed) from "
                                 "config.json")
            in_major = fits[0]
        return Layout(prefix, hf_layer, True, mxfp4, in_major)

    def expert_name(self, arch: MoEArch, expert: int, proj: str) -> str:
        return arch.hf_expert_name(self.hf_layer, expert, proj, self.prefix)

    def fused_name(self, arch: MoEArch, proj: str) -> str:
        return arch.hf_fused_name(self.hf_layer, proj, self.prefix)

    def source_format(self, ckpt: Checkpoint, arch: MoEArch) -> str:
        if self.mxfp4:
            return "mxfp4"
        if self.stacked:
            return ckpt.format_of(arch.hf_stacked_name(self.hf_layer, "down", self.prefix))
        return ckpt.format_of(self.fused_name(arch, "down") if self.fused else self.expert_name(arch, 0, "up"))


def _layers_prefix(ckpt: Checkpoint, arch: MoEArch, spec: ExpertSpec) -> str:
    """What precedes ``layers.N.`` in the names of the experts' tensors: the family's own prefix
    where the checkpoint uses it, else the one it has (a multimodal checkpoint's text model:
    model.language_model., language_model.model.). Looked up at the last MoE layer, which a
    next-token-prediction module's layers (mtp.layers.0) do not reach."""
    if not spec.layers:
        return arch.hf_prefix
    marker = arch.experts_marker(spec.layers[-1]) + "."
    found = {name[: name.index(marker)] for name in ckpt.tensors if marker in name}
    found = {p for p in found if p == "" or p.endswith(".")}
    return arch.hf_prefix if arch.hf_prefix in found or not found else min(found, key=len)


def _plan_projection(ckpt: Checkpoint, arch: MoEArch, spec: ExpertSpec, layer: int, layout: Layout, proj: str,
                     qtype: gguf.GGMLQuantizationType, threads: int) -> PlannedTensor:
    """One projection of a layer whose experts the checkpoint holds one tensor each, or stacked in one."""
    rows, cols = spec.hf_shape(proj)
    check_row_length(qtype, cols, f"{proj} projection of layer {layer}")
    if layout.stacked:
        name = arch.hf_stacked_name(layout.hf_layer, proj, layout.prefix)
        read = ckpt.check(name, (spec.n_experts, rows, cols))

        def produce_stacked() -> np.ndarray:
            w = ckpt.load_f32(name)
            ckpt.release()
            return quantize(w, qtype, threads)

        return PlannedTensor(gguf_expert_name(layer, proj), qtype, (spec.n_experts, rows, cols), produce_stacked, read)
    names = [layout.expert_name(arch, e, proj) for e in range(spec.n_experts)]
    read = sum(ckpt.check(n, (rows, cols)) for n in names)

    def produce() -> np.ndarray:
        stacked = np.empty((len(names), rows, cols), dtype=np.float32)
        for e, n in enumerate(names):
            stacked[e] = ckpt.load_f32(n)
        ckpt.release()  # one projection of one layer in memory at a time
        return quantize(stacked, qtype, threads)

    return PlannedTensor(gguf_expert_name(layer, proj), qtype, (spec.n_experts, rows, cols), produce, read)


def _plan_fused_layer(ckpt: Checkpoint, arch: MoEArch, spec: ExpertSpec, layer: int, layout: Layout,
                      types: dict[str, gguf.GGMLQuantizationType] | None, threads: int) -> list[PlannedTensor]:
    """A layer whose experts the checkpoint holds as one tensor per projection: gate_up (gate's and
    up's rows as arch.fused_gate_up says) and down, float ([E, out, in], or [E, in, out] where
    layout.in_major) or MXFP4 (_blocks [E, out, in/32, 16] and _scales [E, out, in/32]), each with a
    _bias where arch.biased. MXFP4 kept as MXFP4 is copied block by block."""
    E, D, F = spec.n_experts, spec.hidden_size, spec.intermediate_size
    types = types or {p: Q.MXFP4 if layout.mxfp4 else DEFAULT_TYPE for p in PROJECTIONS}
    # per fused tensor: [out, in] of one expert's rows
    fused = {"gate_up": (2 * F, D), "down": (D, F)}
    loaded: dict[str, np.ndarray] = {}  # one fused tensor of the layer at a time, as float or MXFP4 bytes
    planned, read = [], {}
    for name, (out, cols) in fused.items():
        base = layout.fused_name(arch, name)
        if layout.mxfp4:
            read[name] = _check_mxfp4(ckpt, base, (E, out, cols))
        else:
            read[name] = ckpt.check(base, (E, cols, out) if layout.in_major else (E, out, cols))
        if arch.biased:
            ckpt.check(base + "_bias", (E, out))

    def rows_of(name: str, half: slice) -> np.ndarray:
        """One projection's rows from the layer's fused tensor ([E, rows, cols] float, or MXFP4 bytes)."""
        if name not in loaded:
            loaded.clear()
            base = layout.fused_name(arch, name)
            if layout.mxfp4:
                loaded[name] = _ggml_mxfp4(ckpt.load_raw(base + "_blocks"), ckpt.load_raw(base + "_scales"))
            else:
                w = ckpt.load_f32(base)
                loaded[name] = w.transpose(0, 2, 1) if layout.in_major else w  # [E, out, in]
            ckpt.release()
        return loaded[name][:, half]

    parts = _fused_parts(arch.fused_gate_up, F)
    for proj, name, half in parts:
        rows, cols = (D, F) if proj == "down" else (F, D)
        qtype = types[proj]
        check_row_length(qtype, cols, f"{proj} projection of layer {layer}")

        def produce(name=name, half=half, qtype=qtype, rows=rows, cols=cols) -> np.ndarray:
            w = rows_of(name, half)
            if layout.mxfp4 and qtype == Q.MXFP4:
                return np.ascontiguousarray(w)  # the checkpoint's blocks, as ggml lays them out
            if layout.mxfp4:
                w = gguf.quants.dequantize(np.ascontiguousarray(w), Q.MXFP4).reshape(E, rows, cols)
            return quantize(np.ascontiguousarray(w, dtype=np.float32), qtype, threads)

        planned.append(PlannedTensor(gguf_expert_name(layer, proj), qtype, (E, rows, cols), produce,
                                     read[name] // (2 if name == "gate_up" else 1)))
    for proj, name, half in parts if arch.biased else ():
        width = D if proj == "down" else F

        def bias(name=name, half=half) -> np.ndarray:
            return np.ascontiguousarray(ckpt.load_f32(layout.fused_name(arch, name) + "_bias")[:, half])

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
