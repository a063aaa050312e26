"""Quantize float32 arrays into any ggml type with ggml's own quantizer (multithreaded), and write
them into GGUF files (synthetic experts files for tests and benchmarks)."""
from __future__ import annotations

import gguf
import numpy as np

from lvgg import _bridge


def quantize(values: np.ndarray, qtype: gguf.GGMLQuantizationType, threads: int = 1,
             imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [..., n] -> the raw bytes of `qtype` with the same leading shape, [..., row_bytes].

    ``imatrix``: n importance weights (one per column, as a llama.cpp importance matrix holds for
    the weight's input dimension), which IQ1_S, IQ2_XXS and IQ2_XS require and other types use
    where ggml's quantizer takes them."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return values.view(np.uint8).reshape(*values.shape[:-1], values.shape[-1] * 4)
    rows = values.reshape(-1, values.shape[-1])
    row_bytes = _bridge.quantized_row_size(int(qtype), rows.shape[1])
    out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    _bridge.quantize(int(qtype), rows, out, threads, imatrix)
    return out.reshape(*values.shape[:-1], row_bytes)


def add_quantized_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray,
                         qtype: gguf.GGMLQuantizationType) -> None:
    """Add bytes made by quantize() as a tensor of `qtype`."""
    writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def write_all(writer: gguf.GGUFWriter) -> None:
    """Write the header, the metadata and the tensors added, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
