"""Reading the routed experts of a Hugging Face checkpoint (safetensors), one tensor at a time.

Sources: a local folder, or a model id resolved through huggingface-hub's cache (offline mode
respected). Weights: bf16/fp16/fp32; fp8 e4m3 with block scales (the DeepSeek/Qwen FP8
layout: `weight` + `weight_scale_inv`); int4 W4A16 as AutoAWQ's GEMM layout (`qweight`,
`qzeros`, `scales`) or compressed-tensors' symmetric pack-quantized layout (`weight_packed`,
`weight_scale`). Everything is dequantized on the fly.
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
    return json.loads(path.read_text())


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

    def _int4_layout(self, name: str) -> str | None:
        base = name[: -len(".weight")]
        if base + ".qweight" in self.tensors:
            return "awq"
        if base + ".weight_packed" in self.tensors:
            return "compressed-tensors"
        return None

    def _check_int4(self, name: str, shape: tuple[int, int], layout: str) -> int:
        base, (rows, cols) = name[: -len(".weight")], shape
        if layout == "awq":  # qweight [in, out/8] int32, qzeros [in/g, out/8], scales [in/g, out]
            parts = {".qweight": (cols, rows // 8), ".qzeros": None, ".scales": None}
        else:  # weight_packed [out, in/8] int32, weight_scale [out, in/g]
            parts = {".weight_packed": (rows, cols // 8), ".weight_scale": None}
        for suffix, want in parts.items():
            info = self.tensors.get(base + suffix)
            if info is None:
                raise ValueError(f"int4 ({layout}) weight {base!r} has no {base + suffix!r}")
            if want is not None and info.shape != want:
                raise ValueError(f"tensor {base + suffix!r} has shape {list(info.shape)}, expected {list(want)} for "
                                 f"a {rows}x{cols} weight in the {layout} int4 layout")
        return rows * cols // 2

    def check(self, name: str, shape: tuple[int, int]) -> int:
        """Validate one weight; returns the bytes reading it costs."""
        info = self.tensors.get(name)
        if info is None and (layout := self._int4_layout(name)):
            return self._check_int4(name, shape, layout)
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

    def format_of(self, name: str) -> str:
        """How a weight is stored: a safetensors dtype name, or '<layout>-int4'."""
        layout = self._int4_layout(name) if name not in self.tensors else None
        return f"{layout}-int4" if layout else self.tensors[name].dtype.lower()

    def release(self) -> None:
        """Close the open files: their mapped pages stop counting in this process's memory."""
        self._open.clear()

    def load_f32(self, name: str) -> np.ndarray:
        layout = self._int4_layout(name) if name not in self.tensors else None
        if layout == "awq":
            return self._load_awq(name[: -len(".weight")])
        if layout == "compressed-tensors":
            return self._load_compressed_tensors(name[: -len(".weight")])
        t = self._get(name)
        if self.tensors[name].dtype in FP8_DTYPES:
            scale = self._get(_scale_name(name)).float()
            br, bc = self.fp8_block
            scale = scale.repeat_interleave(br, 0)[: t.shape[0]].repeat_interleave(bc, 1)[:, : t.shape[1]]
            return (t.float() * scale).numpy()
        return t.float().numpy()

    def load_raw(self, name: str) -> np.ndarray:
        """A tensor as stored (e.g. MXFP4 blocks' and scales' bytes)."""
        return self._get(name).numpy()

    def _load_awq(self, base: str) -> np.ndarray:
        q = _unpack_int4(self._get(base + ".qweight").numpy(), _AWQ_ORDER)  # [in, out]
        z = _unpack_int4(self._get(base + ".qzeros").numpy(), _AWQ_ORDER)  # [in/g, out]
        scales = self._get(base + ".scales").float().numpy()  # [in/g, out]
        group = q.shape[0] // scales.shape[0]
        w = (q.astype(np.float32) - np.repeat(z, group, 0)) * np.repeat(scales, group, 0)
        return np.ascontiguousarray(w.T)

    def _load_compressed_tensors(self, base: str) -> np.ndarray:
        q = _unpack_int4(self._get(base + ".weight_packed").numpy(), range(8))  # [out, in], offset by 8
        scales = self._get(base + ".weight_scale").float().numpy()  # [out, in/g]
        group = q.shape[1] // scales.shape[1]
        return (q.astype(np.float32) - 8.0) * np.repeat(scales, group, 1)

    def _get(self, name: str) -> Any:
        from safetensors import safe_open

        info = self.tensors[name]
        if info.file not in self._open:
            self._open[info.file] = safe_open(info.file, "pt")
        return self._open[info.file].get_tensor(name)


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".weight_scale_inv"


# AutoAWQ's GEMM packing stores the 8 nibbles of an int32 in this column order.
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _unpack_int4(packed: np.ndarray, order: Any) -> np.ndarray:
    """int32 [r, c/8] with 8 nibbles each -> uint8 [r, c]; nibble i holds column order[i] of its group."""
    p = packed.astype(np.int64) & 0xFFFFFFFF
    out = np.empty((p.shape[0], p.shape[1], 8), dtype=np.uint8)
    for i, col in enumerate(order):
        out[:, :, col] = (p >> (4 * i)) & 0xF
    return out.reshape(p.shape[0], -1)
