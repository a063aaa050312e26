"""Write an experts file (GGUF) tensor by tensor, under a temporary name renamed at the end.

Tensor infos are declared first, then each tensor's bytes are produced and written in order,
so at most one tensor is in memory. A failure or Ctrl-C removes the temporary file: nothing
is ever left under the final name unless the whole file was written.
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

CONVERTER_VERSION = "1"


@dataclass
class PlannedTensor:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # elements, numpy order: [experts, rows, row length]
    produce: Callable[[], np.ndarray]  # the tensor's bytes (any dtype; only nbytes and order matter)
    source_bytes: int  # what producing it reads, for the progress bar

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return tuple(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))


def check_output_path(out: Path) -> None:
    """Fail before any work when the file could not be written."""
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {folder} is not writable; pick another -o")
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; give a file name ending in .gguf")


def _add_metadata(writer: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint64(key, value) if value >= 2**32 else writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        else:
            raise TypeError(f"metadata {key}: cannot store {type(value).__name__}")


def write_experts_gguf(out: Path, gguf_arch: str, metadata: dict[str, Any], tensors: list[PlannedTensor],
                       quiet: bool = False) -> Path:
    out = Path(out)
    check_output_path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, gguf_arch)
        _add_metadata(writer, metadata)
        for t in tensors:
            shape = t.byte_shape
            writer.add_tensor_info(t.name, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        columns = (TextColumn("{task.description}"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=quiet, transient=False) as progress:
            task = progress.add_task(f"writing {out.name}", total=sum(t.source_bytes for t in tensors))
            for t in tensors:
                data = np.ascontiguousarray(t.produce())
                expected = int(np.prod(t.byte_shape))
                if data.nbytes != expected:
                    raise RuntimeError(f"{t.name}: produced {data.nbytes} bytes, expected {expected}")
                writer.write_tensor_data(data.view(np.uint8).reshape(t.byte_shape))
                progress.advance(task, t.source_bytes)
        writer.close()
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # numpy's tofile reports a short write as "N requested and M written", without an errno
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or (e.errno is None and "requested and" in str(e)):
            raise OSError(f"could not write {out} (disk full or file-size limit): {_space_left(out)}; nothing was "
                          "left under that name") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _space_left(out: Path) -> str:
    """What limits a file there: the filesystem's free space and the process's file-size limit."""
    free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size_limit = "" if limit == resource.RLIM_INFINITY else f", and this process may write files of {limit >> 20} MiB " \
        "at most (ulimit -f)"
    return f"{free >> 20} MiB free on its filesystem{size_limit}"


def layer_types_metadata(tensors: list[PlannedTensor]) -> list[str]:
    """One 'blk.N: gate=Q4_K up=Q4_K down=Q6_K' line per layer, for lvgg.layer_types."""
    by_layer: dict[int, list[str]] = {}
    for t in tensors:
        if not t.name.endswith(".weight"):
            continue  # biases: f32
        layer = int(t.name.split(".")[1])
        proj = t.name.split(".")[2][len("ffn_"):-len("_exps")]
        by_layer.setdefault(layer, []).append(f"{proj}={t.qtype.name}")
    return [f"blk.{layer}: {' '.join(v)}" for layer, v in sorted(by_layer.items())]
