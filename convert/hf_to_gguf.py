"""Hugging Face checkpoint -> experts file: every routed expert, quantized with ggml's quantizer."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from .experts_writer import CONVERTER_VERSION, PlannedTensor, layer_types_metadata, write_experts_gguf
from .hf_source import Checkpoint, read_config, resolve_source
from .output_types import check_row_length
from lvgg.models import PROJECTIONS, ExpertSpec, arch_for, gguf_expert_name
from lvgg.quantize import quantize


def expert_hyperparameters(gguf_arch: str, spec: ExpertSpec, n_layers: int) -> dict[str, int]:
    """The model-shape keys llama.cpp uses, so the plugin can check a file against a model."""
    return {f"{gguf_arch}.block_count": n_layers, f"{gguf_arch}.embedding_length": spec.hidden_size,
            f"{gguf_arch}.expert_count": spec.n_experts, f"{gguf_arch}.expert_used_count": spec.top_k,
            f"{gguf_arch}.expert_feed_forward_length": spec.intermediate_size}


def convert_hf(src: str, out: Path, types: dict[str, gguf.GGMLQuantizationType], threads: int,
               quiet: bool = False) -> Path:
    folder, revision = resolve_source(src)
    config = read_config(folder)
    arch = arch_for(config.get("model_type", "?"))
    spec = arch.spec(config)
    ckpt = Checkpoint(folder, config)

    planned = []
    for layer in spec.layers:
        for proj in PROJECTIONS:
            rows, cols = spec.hf_shape(proj)
            check_row_length(types[proj], cols, f"{proj} projection of layer {layer}")
            names = [arch.hf_expert_name(layer, e, proj) for e in range(spec.n_experts)]
            read = sum(ckpt.check(n, (rows, cols)) for n in names)

            def produce(names=names, rows=rows, cols=cols, qtype=types[proj]) -> np.ndarray:
                stacked = np.empty((len(names), rows, cols), dtype=np.float32)
                for e, n in enumerate(names):
                    stacked[e] = ckpt.load_f32(n)
                ckpt.release()  # one projection of one layer in memory at a time
                return quantize(stacked, qtype, threads)

            planned.append(PlannedTensor(gguf_expert_name(layer, proj), types[proj],
                                         (spec.n_experts, rows, cols), produce, read))

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
