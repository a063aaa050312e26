"""Routed experts of CUDA tensors computed by the CPU engine, in the stream's order.

    experts = lvgg.CudaExperts(moe, hidden_size=2048, top_k=8, max_tokens=8192, dtype=torch.bfloat16)
    out = experts(layer, x, topk_ids, topk_weights)      # CUDA tensors in, CUDA tensor out

Per call, on the current stream: the inputs are copied into pinned host buffers, the CPU is
told to compute the layer, the stream waits for it, and the result is copied back. Nothing
synchronizes the device and no Python runs in between, so the whole sequence can be captured
into a CUDA graph (vLLM's FULL and piecewise modes) and replayed.

How the CPU is told (``signal``): "flags" (the default): the stream writes a word in pinned
memory that a thread of the bridge polls, and waits on a second word that the thread writes
when done (stream memory operations): a few microseconds per layer; the thread spins between
layers and naps when idle. "host_function": the driver runs the layer in a host function
(cuLaunchHostFunc), which costs tens of microseconds per layer to start and resume; no thread
of lvgg's waits. With LVGG_POWER_SAVING=1, or a driver without stream memory operations,
host functions are used.
"""
from __future__ import annotations

import contextlib
import logging
import math
import mmap

import torch

from lvgg import _bridge
from lvgg.experts import CpuMoE

log = logging.getLogger("vllm.lvgg")  # vLLM's handlers and level

SIGNALS = ("flags", "host_function")
_HOST_REGISTER_MAPPED = 0x02  # CU_MEMHOSTREGISTER_DEVICEMAP: the device writes and polls the flags there


@contextlib.contextmanager
def _driver_context(device: torch.device | None):
    """``device``'s context (the current device's by default) current in this thread, as the
    driver's calls need it: a runtime call (the synchronize) makes it so."""
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        yield


def register_host(address: int, nbytes: int, flags: int, device: torch.device | None = None) -> None:
    """Page-lock host memory for CUDA, in ``device``'s context. Through the driver: a failure
    raises RuntimeError here and leaves nothing behind, where the runtime's cudaHostRegister
    leaves its error for torch's next CUDA call to raise."""
    with _driver_context(device):
        _bridge.register_host_memory(address, nbytes, flags)


def unregister_host(address: int, device: torch.device | None = None) -> None:
    """Undo ``register_host``; the device must be done with the memory."""
    with _driver_context(device):
        _bridge.unregister_host_memory(address)


def _pinned(shape: tuple[int, ...], dtype: torch.dtype, flags: int = 0) -> torch.Tensor:
    """Page-locked memory outside torch's caching host allocator (its events do not mix with capture),
    on pages of its own (an anonymous mapping): a page shared with another registered buffer
    cannot be registered."""
    nbytes = math.prod(shape) * dtype.itemsize
    span = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    t = torch.frombuffer(mmap.mmap(-1, span), dtype=torch.uint8)[:nbytes].view(dtype).view(shape)
    try:
        register_host(t.data_ptr(), span, flags)
    except RuntimeError as e:
        raise RuntimeError(f"could not pin {span >> 10} KiB of host memory for the CUDA bridge ({e}); check free "
                           "RAM and the locked-memory limit (ulimit -l)") from None
    return t


class CudaExperts:
    """lvgg's CPU experts called with CUDA tensors, capturable in CUDA graphs.

    Buffers of ``max_tokens`` rows are pinned once (inputs in ``dtype``, ids int32, weights
    float32). Calls on one CudaExperts are ordered by their streams; use one per device.
    signal: "flags", "host_function" or None (flags unless LVGG_POWER_SAVING is set); ``signal``
    after creation says what is used (host functions where the driver has no stream memory
    operations).
    """

    def __init__(self, moe: CpuMoE, *, hidden_size: int, top_k: int, max_tokens: int, dtype: torch.dtype,
                 signal: str | None = None) -> None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if signal is None:
            signal = "host_function" if _bridge.power_saving() else "flags"
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, found {signal!r}")
        self.moe, self.hidden_size, self.top_k, self.max_tokens, self.dtype = moe, hidden_size, top_k, max_tokens, dtype
        self._x = _pinned((max_tokens, hidden_size), dtype)
        self._ids = _pinned((max_tokens, top_k), torch.int32)
        self._weights = _pinned((max_tokens, top_k), torch.float32)
        self._out = _pinned((max_tokens, hidden_size), dtype)
        self._real_rows = _pinned((1, 1), torch.int32)
        self._signals = None
        if signal == "flags":
            try:
                self._signals = _pinned((2, 16), torch.int32, _HOST_REGISTER_MAPPED)
            except RuntimeError as e:  # host functions still work
                log.warning("lvgg: the CUDA bridge hands layers to the CPU through host functions: %s", e)
        self._bridge = _bridge.CudaBridge(moe._engine, self._x, self._ids, self._weights, self._out, self._signals,
                                          self._real_rows)
        self.signal = "flags" if self._bridge.flags else "host_function"

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 inputs_copied: torch.cuda.Event | None = None, real_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's experts of ``x``; ``inputs_copied``, if given, is recorded on the stream once
        the inputs are in the pinned buffers, before the CPU starts (work on other streams that
        waits for it then runs alongside the CPU without delaying these copies). ``real_rows``: a
        one-element int32 CUDA tensor, read in stream order, with how many of x's rows are real
        (vLLM pads a batch to its graph's size): the CPU leaves the others out and they come back
        0 (a value outside 0..rows-1 computes every row)."""
        n = x.shape[0] if x.dim() == 2 else -1
        for name, t, cols in (("x", x, self.hidden_size), ("topk_ids", topk_ids, self.top_k),
                              ("topk_weights", topk_weights, self.top_k)):
            if not t.is_cuda:
                raise TypeError(f"{name} is on {t.device}; CudaExperts takes CUDA tensors (CpuMoE takes CPU ones)")
            if tuple(t.shape) != (n, cols):
                raise ValueError(f"{name} must be [tokens, {cols}] with the tokens of x, found {list(t.shape)}")
        if not 1 <= n <= self.max_tokens:
            raise ValueError(f"x has {n} tokens; this CudaExperts takes 1..{self.max_tokens} (max_tokens)")
        if self._bridge is None:
            raise RuntimeError("this CudaExperts was closed; make a new one")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_ids must be int32 or int64, found {topk_ids.dtype}")
        if real_rows is not None and (real_rows.numel() != 1 or real_rows.dtype != torch.int32
                                      or not real_rows.is_cuda):
            raise ValueError(f"real_rows must be one int32 on a CUDA device, found {real_rows.dtype} "
                             f"{list(real_rows.shape)} on {real_rows.device}")
        stream = torch.cuda.current_stream(x.device)
        self._x[:n].copy_(x, non_blocking=True)
        self._ids[:n].copy_(topk_ids, non_blocking=True)
        self._weights[:n].copy_(topk_weights, non_blocking=True)
        if real_rows is not None:
            self._real_rows.view(1).copy_(real_rows.view(1), non_blocking=True)
        if inputs_copied is not None:
            inputs_copied.record(stream)
        self._bridge.enqueue(stream.cuda_stream, layer, n, real_rows is not None)
        out = torch.empty_like(x)
        out.copy_(self._out[:n], non_blocking=True)
        return out

    def check(self) -> None:
        """Raise the error a host function met since the last call, if any (calls check too)."""
        if self._bridge is not None:
            self._bridge.check()

    def close(self) -> None:
        """Unpin the buffers; the device must be done with them (synchronize first)."""
        if self._bridge is None:
            return
        self._bridge = None  # stops its polling thread, if any, before the flags are unpinned
        for t in (self._x, self._ids, self._weights, self._out, self._real_rows, self._signals):
            if t is not None:
                unregister_host(t.data_ptr())

    def __del__(self) -> None:
        # A registration outliving its pages would make the next buffer mapped there unpinnable.
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
