"""Reading the routed experts of a Hugging Face checkpoint (safetensors), one tensor at a time.

Sources: a local folder, or a model id resolved through huggingface-hub's cache (offline mode
respected). Weights: bf16/fp16/fp32, and fp8 e4m3 with block scales (the DeepSeek/Qwen FP8
layout: `weight` + `weight_scale_inv`), dequantized on the fly.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FLOAT_DTYPES = {"BF16", "F16", "F32"}
FP8_DTYPES = {"F8_E4M3"}


def resolve_source(src: str) -> tuple[Path, str]:
    """(folder, revision) for a local folder or a Hugging Face model id."""
    path = Path(src)
    if path.is_dir():
        return path, _folder_hash(path)
    if path.exists():
        raise ValueError(f"{src} is a file; pass the model's folder (or a llama.cpp GGUF with --from-gguf)")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{src}: no such model folder (and not a Hugging Face model id 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors"],
                                        local_files_only=HF_HUB_OFFLINE))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{src} is not in the local Hugging Face cache" + (" and HF_HUB_OFFLINE is set, so no download was "
                                                               "attempted" if HF_HUB_OFFLINE else "") +
            "; download it (huggingface-cli download) or pass a local folder") from e
    except Exception as e:  # network errors, gated or missing repos
        raise FileNotFoundError(f"could not fetch {src} from the Hugging Face hub: {e}") from e
    return folder, folder.name  # snapshot folders are named by commit


def _folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).exists():
            h.update((folder / name).read_bytes())
    return "sha256:" + h.hexdigest()[:16]


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = json.loads(path.read_text())
    return cfg.get("text_config", cfg) if "model_type" not in cfg else cfg


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name


class Checkpoint:
    """The safetensors files of a folder, indexed by tensor name (headers only)."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} has no .safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            with safe_open(f, "pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    self.tensors[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
        qcfg = config.get("quantization_config") or {}
        self.fp8_block = tuple(qcfg.get("weight_block_size") or (128, 128))
        self._open: dict[Path, Any] = {}

    def check(self, name: str, shape: tuple[int, int]) -> int:
        """Validate one weight; returns the bytes reading it costs."""
        info = self.tensors.get(name)
        if info is None:
            raise ValueError(f"the checkpoint has no tensor {name!r} (expected shape {list(shape)})")
        if info.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} from config.json")
        if info.dtype in FP8_DTYPES:
            if _scale_name(name) not in self.tensors:
                raise ValueError(f"fp8 tensor {name!r} has no {_scale_name(name)!r}: only block-scaled fp8 "
                                 "(DeepSeek/Qwen FP8 layout) is supported")
            return int(np.prod(shape))
        if info.dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {info.dtype}, which lvgg convert cannot read "
                             f"(supported: {', '.join(sorted(FLOAT_DTYPES | FP8_DTYPES))}, fp8 with block scales)")
        return int(np.prod(shape)) * {"BF16": 2, "F16": 2, "F32": 4}[info.dtype]

    def release(self) -> None:
        """Close the open files: their mapped pages stop counting in this process's memory."""
        self._open.clear()

    def load_f32(self, name: str) -> np.ndarray:
        t = self._get(name)
        if self.tensors[name].dtype in FP8_DTYPES:
            scale = self._get(_scale_name(name)).float()
            br, bc = self.fp8_block
            scale = scale.repeat_interleave(br, 0)[: t.shape[0]].repeat_interleave(bc, 1)[:, : t.shape[1]]
            return (t.float() * scale).numpy()
        return t.float().numpy()

    def _get(self, name: str) -> Any:
        from safetensors import safe_open

        info = self.tensors[name]
        if info.file not in self._open:
            self._open[info.file] = safe_open(info.file, "pt")
        return self._open[info.file].get_tensor(name)


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".weight_scale_inv"
