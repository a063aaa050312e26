"""Routed experts computed on the GPU from host memory: streamed for long prefills, resident
for chosen layers, or fetched a few at a time for decode steps split with the CPU.

    from lvgg.gpu.experts import GpuExperts      # streamed/resident layers need vLLM's CUDA build
    gpu = GpuExperts(store, device="cuda", dtype=torch.bfloat16, streamed_layers=[2, 3], resident_layers=[0, 1])
    out = gpu(layer, x, topk_ids, topk_weights)          # CUDA tensors, any number of tokens

The GPU reads each projection where the CPU engine keeps it: its copy in lvgg's packed layout
(a repacked store on an AVX-512 VNNI CPU; then the file's pages are never read), else the
experts file's mapping. Either is registered with CUDA (pinned), so copies run at the PCIe
link's speed and kernels read it over the link.

Streamed layers: the bytes of each layer are copied to the GPU on a side stream into
one of two staging slots while the previous layer computes, dequantized by lvgg's Triton kernels
into one shared pair of weight buffers in vLLM's layout (w13 = [gate; up], w2 = down), and
multiplied by vLLM's fused MoE kernel. After the last layer the first one is fetched for the
next pass. A layer too big for the VRAM given to streaming goes in groups of experts
(``stream_group``), each multiplied with the others' ids masked out. Resident layers are copied
once at creation and stay on the GPU as their quantized bytes: passes of up to
RESIDENT_BYTES_MOST_TOKENS tokens (decode) multiply the experts straight from those bytes
(lvgg's expert kernels), longer ones dequantize the layer into one shared pair of weights for
vLLM's fused MoE (``quantized_resident=False``: each layer dequantized once, ~3.5x the VRAM of
Q4_K). Split layers (`fetched`): a kernel reads the chosen experts' bytes straight from pinned host memory (ids on the device, so CUDA graphs capture
it) and lvgg's expert kernels multiply them from those bytes (lvgg.gpu.split).

Nothing here synchronizes the device; calls are ordered by the current stream. Streamed calls
keep Python state about the staging slots, so they must not be captured in a CUDA graph
(resident and fetched ones may). The experts are SwiGLU (vLLM's default activation), as the plugin's are.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
import time
import warnings
from typing import Sequence

import numpy as np
import torch

from lvgg import _bridge
from lvgg.gpu.bridge import register_host, unregister_host
from lvgg.experts import ExpertLayerInfo, ExpertStore
from lvgg.gpu.dequant import (SUPPORTED_TYPES, StagedProjection, dequantize, gated_activations, gather_rows,
                              matrix_nbytes, raw_nbytes, weighted_down)

log = logging.getLogger("vllm.lvgg")  # vLLM's handlers and level

# Quantized resident layers: passes of at most this many tokens multiply the bytes (every slot
# reads its expert's bytes; longer passes dequantize the layer once and share the weights).
RESIDENT_BYTES_MOST_TOKENS = 16

# CU_MEMHOSTREGISTER_DEVICEMAP | CU_MEMHOSTREGISTER_READ_ONLY: kernels read the file, which is mapped read-only
_HOST_REGISTER_FLAGS = 0x02 | 0x08
# Mapped files this process pinned, by address: how many GpuExperts read each (CUDA refuses to
# register a range twice; a test's shares of one store each make their own).
_pin_users: dict[int, int] = {}
_pin_lock = threading.Lock()


def _unpin(address: int, device: torch.device) -> None:
    """One user of a pinned range is done (under _pin_lock): the last unregisters it."""
    _pin_users[address] -= 1
    if not _pin_users[address]:
        del _pin_users[address]
        unregister_host(address, device)


def _gpu_layout(info: ExpertLayerInfo) -> list[tuple[str, slice | None]]:
    """(projection, the rows of vLLM's w13 it fills, or None for w2), as the GPU reads them: gate
    and up as one where the file fuses them or the CPU engine packed them together."""
    f = info.intermediate_size
    fused_twin = "gate" in info.twins and info.twins["gate"] == info.twins.get("up")
    if info.form == "gate_up+down" or (info.form == "gate+up+down" and fused_twin):
        return [("gate_up", slice(0, 2 * f)), ("down", None)]
    if info.form == "gate+up+down":
        return [("gate", slice(0, f)), ("up", slice(f, 2 * f)), ("down", None)]
    raise ValueError(f"layer {info.index} has {info.form} experts; the GPU runs gated (SwiGLU) experts only")


def _type(info: ExpertLayerInfo, projection: str) -> str:
    """A projection's ggml type (gate's for gate and up packed as one)."""
    return info.types.get(projection) or info.types["gate"]


def _twin(info: ExpertLayerInfo, projection: str) -> tuple[int, int] | None:
    """(address, bytes) of the CPU engine's packed copy the GPU reads a projection from, or None
    for the file."""
    return info.twins.get(projection) or (info.twins.get("gate") if projection == "gate_up" else None)


def gpu_unsupported(info: ExpertLayerInfo, activation: str = "silu") -> str | None:
    """Why this layer's experts (computed with ``activation``, the CPU engine's name) cannot run
    on the GPU, or None when they can."""
    if info.form not in ("gate+up+down", "gate_up+down"):
        return f"{info.form} experts (the GPU runs gated SwiGLU experts)"
    if info.biased:
        return "experts with biases (gpt-oss; the GPU runs bias-free SwiGLU experts)"
    if activation != "silu":
        return f"{activation} experts (the GPU runs SwiGLU experts)"
    bad = sorted({t.upper() for t in info.types.values() if t.upper() not in SUPPORTED_TYPES})
    return f"types {bad} (no GPU dequantization)" if bad else None


def _shape(info: ExpertLayerInfo, projection: str) -> tuple[int, int]:
    """(rows, columns) of one expert's matrix of a projection."""
    rows = {"gate": info.intermediate_size, "up": info.intermediate_size,
            "gate_up": 2 * info.intermediate_size, "down": info.hidden_size}[projection]
    return rows, info.hidden_size if projection != "down" else info.down_columns


def _nbytes(info: ExpertLayerInfo, projection: str) -> int:
    """A projection's bytes where the GPU reads them (the file, or the CPU engine's packed copy)."""
    return info.n_experts * matrix_nbytes(_type(info, projection), *_shape(info, projection),
                                          _twin(info, projection) is not None)


def _pieces(info: ExpertLayerInfo, n_experts: int | None = None) -> list[tuple[str, int, int]]:
    """(projection, the bytes of ``n_experts`` of its experts (default: all), where they start in a
    staging buffer) for a layer."""
    n = info.n_experts if n_experts is None else n_experts
    at, pieces = 0, []
    for projection, _ in _gpu_layout(info):
        nbytes = _nbytes(info, projection) // info.n_experts * n
        pieces.append((projection, nbytes, at))
        at += _aligned(nbytes)  # each piece starts aligned
    return pieces


def staged_bytes(info: ExpertLayerInfo, n_experts: int | None = None) -> int:
    """Bytes ``n_experts`` (default: all) of a layer's experts take on the GPU before
    dequantization (their file bytes, each projection aligned)."""
    _, nbytes, at = _pieces(info, n_experts)[-1]
    return at + nbytes


def link_bytes(info: ExpertLayerInfo, n_experts: int | None = None) -> int:
    """Bytes ``n_experts`` (default: all) of a layer's experts take over the link to the GPU
    (their file bytes: what a streamed layer copies, or a split's ``fetched`` gathers)."""
    return sum(nbytes for _, nbytes, _ in _pieces(info, n_experts))


def _share_info(whole: ExpertLayerInfo, rows: tuple[int, int], columns: tuple[int, int],
                experts: tuple[int, int]) -> ExpertLayerInfo:
    """A layer as the share holding intermediate rows [a, b) and columns [c, d) of down (its whole
    blocks around them) of experts [e, f) sees it: the sizes and bytes the GPU holds (offsets
    stay the whole projections' in the file)."""
    share = dataclasses.replace(whole, n_experts=experts[1] - experts[0], first_expert=experts[0],
                                intermediate_size=rows[1] - rows[0], down_columns=columns[1] - columns[0],
                                down_lead=rows[0] - columns[0], twins=_twins_of(whole, rows, columns))
    return dataclasses.replace(share, nbytes=sum(_nbytes(share, p) for p, _ in _gpu_layout(share)))


def _twins_of(whole: ExpertLayerInfo, rows: tuple[int, int], columns: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """The packed copies a share reads (``ExpertLayerInfo.twins``): the store's where the share has
    all its rows and columns (its copies hold whole matrices); none for a tensor-parallel share of
    them, which reads the file."""
    whole_matrices = rows[1] - rows[0] == whole.intermediate_size and columns[1] - columns[0] == whole.down_columns
    return whole.twins if whole_matrices else {}


def _share_of(store: ExpertStore, layer: int, part: tuple[int, int],
              by: str) -> tuple[ExpertLayerInfo, tuple, tuple, tuple]:
    """(the whole layer, the intermediate rows, the columns of down and the experts, as the router
    numbers them) that ``store.part(*part, by=by)`` holds of the layer; for part (0, 1) all the
    store holds (a part's store: its own share, its down's lead included)."""
    whole = store.layer_info(layer)
    if tuple(part) == (0, 1):
        f, lead, first = whole.intermediate_size, whole.down_lead, whole.first_expert
        return whole, (0, f), (-lead, whole.down_columns - lead), (first, first + whole.n_experts)
    return whole, *store.part_shape(layer, *part, by)


def reads_packed(info: ExpertLayerInfo) -> bool:
    """The GPU reads every projection of this layer (a share's ``layer_infos``) from the CPU engine's
    packed copy, none from the file."""
    return all(_twin(info, p) for p, _ in _gpu_layout(info))


def layer_infos(store: ExpertStore, part: tuple[int, int] = (0, 1), by: str = "rows") -> dict[int, ExpertLayerInfo]:
    """Every MoE layer of ``store`` as share ``part`` = (index, count), by rows, blocks or experts
    (ExpertStore.part), sees it."""
    return {layer: _share_info(*_share_of(store, layer, part, by)) for layer in store.layers}


def _host_bytes(buffer) -> torch.Tensor:
    """Host memory (a buffer: the file's mapping, a packed copy) as a uint8 CPU tensor that nothing
    writes through (``_pin_host`` registers it with CUDA)."""
    with warnings.catch_warnings():  # a read-only buffer (the mapping) makes a read-only array
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))


def _host_views(host: torch.Tensor | None, whole: ExpertLayerInfo, rows: tuple[int, int],
                columns: tuple[int, int]) -> list[list[torch.Tensor]]:
    """Per projection of a layer, the views of host memory whose bytes, expert by expert
    ([experts, lines, bytes] each) and end to end, are a share's (``_share_of``): of the mapped
    file (``host``), rows [a, b) of gate and up (of both halves of a fused gate_up), columns
    [c, d) of every row of down (whole blocks). A share of whole matrices (``_twins_of``) has one
    contiguous view per projection: the CPU engine's packed copy where it has one, else the file's.
    Each view's first expert is the store's (``whole.first_expert``, as the router numbers it)."""
    a, b = rows
    d, f, n = whole.hidden_size, whole.intermediate_size, whole.n_experts
    read = dataclasses.replace(whole, twins=_twins_of(whole, rows, columns))
    views = []
    for projection, _ in _gpu_layout(read):
        twin = _twin(read, projection)
        if twin is not None:
            copy = (ctypes.c_uint8 * _nbytes(whole, projection)).from_address(twin[0])
            views.append([_host_bytes(copy).view(n, 1, -1)])
            continue
        ggml_type, start = whole.types[projection], whole.offsets[projection]
        data = host[start:start + _nbytes(whole, projection)]
        if projection == "down":
            lines = data.view(n, d, raw_nbytes(ggml_type, f))
            views.append([lines[:, :, raw_nbytes(ggml_type, columns[0]):raw_nbytes(ggml_type, columns[1])]])
            continue
        lines = data.view(n, -1, raw_nbytes(ggml_type, d))  # [experts, rows, bytes of a row]
        if (a, b) == (0, f):
            views.append([lines])
        else:
            views.append([lines[:, h * f + a:h * f + b] for h in range(2 if projection == "gate_up" else 1)])
    return views


def _gather(views: list[torch.Tensor], first: int, ids: torch.Tensor, out: torch.Tensor) -> None:
    """``out[j]`` ([m, bytes] uint8 on the device) = expert ``ids[j]``'s bytes of ``views``
    (_host_views', their experts numbered from ``first``), end to end; on the current stream."""
    at = 0
    for view in views:
        nbytes = view[0].numel()
        gather_rows(view, ids, out[:, at:at + nbytes].view(out.shape[0], *view.shape[1:]), first)
        at += nbytes


def _copy_share(views: list[torch.Tensor], out: torch.Tensor) -> None:
    """``out`` ([n, bytes] uint8 on the device) = the bytes of ``views`` ([n, lines, bytes] each,
    pinned host memory: a share's of n experts) end to end, one 2-d copy per view by the copy
    engine, on the current stream."""
    stream, at = torch.cuda.current_stream(out.device).cuda_stream, 0
    for src in views:
        n, lines, width = src.shape
        dst = out[:, at:at + lines * width]
        if src.stride(0) == lines * src.stride(1) and dst.stride(0) == lines * width:  # a row per line (down's)
            _bridge.copy_rows_to_device(dst.data_ptr(), width, src.data_ptr(), src.stride(1), width, n * lines, stream)
        elif src.stride(1) == width:  # a row per expert (its lines end to end: gate's, up's)
            _bridge.copy_rows_to_device(dst.data_ptr(), dst.stride(0), src.data_ptr(), src.stride(0), lines * width, n,
                                        stream)
        else:
            raise ValueError(f"no 2-d copy of a [{n}, {lines}, {width}] share with strides {list(src.stride())}")
        at += lines * width


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to whole 256-byte units (where staged pieces start)."""
    return -(-nbytes // 256) * 256


def _staged(info: ExpertLayerInfo, projection: str, data: torch.Tensor) -> list[StagedProjection]:
    """A projection's fetched bytes for the expert kernels (gate_up: its gate and up halves)."""
    d, f = info.hidden_size, info.intermediate_size
    ggml_type, packed = _type(info, projection), _twin(info, projection) is not None
    if projection == "down":
        return [StagedProjection(data, ggml_type, d, info.down_columns, packed=packed)]
    if projection == "gate_up":
        return [StagedProjection(data, ggml_type, f, d, packed=packed),
                StagedProjection(data, ggml_type, f, d, at=matrix_nbytes(ggml_type, f, d, packed), packed=packed)]
    return [StagedProjection(data, ggml_type, f, d, packed=packed)]


def _multiply_staged(info: ExpertLayerInfo, x: torch.Tensor, staged: list[StagedProjection],
                     slot_expert: torch.Tensor, topk_weights: torch.Tensor, before_down=None) -> torch.Tensor:
    """The MoE of ``x`` with the staged experts (gate, up, down: ``_staged``'s, one expert per row
    of their data) of each slot's ``slot_expert`` (-1: none), multiplied from their bytes;
    ``before_down()`` runs between the two kernels (e.g. a wait for down's bytes)."""
    gate, up, down = staged
    act = gated_activations(x.contiguous(), gate, up, slot_expert)
    if before_down is not None:
        before_down()
    # a share's down: whole blocks of columns around its rows
    return weighted_down(act, down, topk_weights.float().contiguous(), slot_expert, x.dtype, lead=info.down_lead)


def stream_groups(n_experts: int, most: int | None) -> list[range]:
    """The experts of a layer in the fewest groups of at most ``most`` (None: one group), as even
    as whole experts allow: what each streamed copy holds."""
    if most is not None and most < 1:
        raise ValueError(f"a streamed group holds at least one expert, found {most}")
    n_groups = 1 if most is None else -(-n_experts // most)
    size = -(-n_experts // n_groups)
    return [range(e, min(n_experts, e + size)) for e in range(0, n_experts, size)]


def _shares_streamed_weights(infos: dict[int, ExpertLayerInfo], streamed: Sequence[int], resident: Sequence[int],
                             stream_group: int | None) -> bool:
    """Quantized resident layers dequantize longer passes into the streamed layers' weights, where
    those hold whole layers of the same shape at least as wide."""
    if not streamed or len(stream_groups(infos[streamed[0]].n_experts, stream_group)) > 1:
        return False
    shape = {(infos[n].n_experts, infos[n].hidden_size, infos[n].intermediate_size) for n in [*streamed, *resident]}
    return len(shape) == 1 and max(infos[n].down_columns for n in resident) <= \
        max(infos[n].down_columns for n in streamed)


def estimate_vram_bytes(infos: dict[int, ExpertLayerInfo], streamed: Sequence[int], resident: Sequence[int],
                        dtype: torch.dtype, split: Sequence[int] = (), split_experts: int = 0,
                        stream_group: int | None = None, quantized_resident: bool = True) -> int:
    """What GpuExperts(streamed_layers=..., resident_layers=..., split_layers=..., split_experts=...,
    stream_group=..., quantized_resident=...) will hold on the device."""
    def weights(info: ExpertLayerInfo, n_experts: int, down_columns: int | None = None) -> int:
        return n_experts * info.hidden_size * (2 * info.intermediate_size + (down_columns or info.down_columns)) \
            * dtype.itemsize

    if quantized_resident:
        total = sum(staged_bytes(infos[layer]) for layer in resident)
        if resident and not _shares_streamed_weights(infos, streamed, resident, stream_group):
            first = infos[resident[0]]
            total += weights(first, first.n_experts, max(infos[layer].down_columns for layer in resident))
    else:
        total = sum(weights(infos[layer], infos[layer].n_experts) for layer in resident)
    if streamed:
        group = len(stream_groups(infos[streamed[0]].n_experts, stream_group)[0])
        total += max(weights(infos[layer], group) for layer in streamed)
        total += 2 * max(staged_bytes(infos[layer], group) for layer in streamed)
    if split and split_experts:
        total += max(_aligned(staged_bytes(infos[layer], split_experts)) for layer in split)
    return total


class GpuExperts:
    """The experts of ``store`` on one CUDA device: ``streamed_layers`` fetched per call,
    ``resident_layers`` copied once (kept as their bytes, or with ``quantized_resident=False``
    dequantized once).

    dtype: of the hidden states and of the dequantized weights (vLLM's model dtype).
    ``split_layers`` may fetch up to ``split_experts`` experts per call (``fetched``).
    ``stream_group``: the most experts of a streamed layer copied and dequantized at once (None:
    the whole layer); a layer in several groups is multiplied group by group, so the VRAM streaming
    takes is bounded by the group, not the layer.
    VRAM: two staging slots of a group's file bytes, one group of weights in ``dtype`` for the
    streamed layers, every resident layer's bytes and one layer of weights they share (or every
    resident layer's weights), and the bytes of ``split_experts`` experts for the split layers
    (``vram_bytes``).
    ``part`` = (index, count) and ``by``: compute what ``store.part(index, count, by=by)`` holds,
    intermediate rows of every expert (by rows or blocks: a tensor-parallel rank's) or whole
    experts (an expert-parallel rank's: slots routed to others add nothing); the parts' outputs
    sum to the layer's. A share's bytes are read from the whole file (``store``, mapped), only
    they cross the link; the whole layer's from the store's packed copy where it has one
    (``reads_packed_copy``).
    """

    def __init__(self, store: ExpertStore, *, device: torch.device | str, dtype: torch.dtype,
                 streamed_layers: Sequence[int] = (), resident_layers: Sequence[int] = (),
                 split_layers: Sequence[int] = (), split_experts: int = 0,
                 stream_group: int | None = None, part: tuple[int, int] = (0, 1), by: str = "rows",
                 quantized_resident: bool = True) -> None:
        self.store, self.device, self.dtype, self.part = store, torch.device(device), dtype, tuple(part)
        self.quantized_resident = quantized_resident
        if len(self.part) != 2 or not 0 <= self.part[0] < self.part[1]:
            raise ValueError(f"part must be (index, count) with 0 <= index < count, found {part}")
        overlap = sorted(set(streamed_layers) & set(resident_layers))
        if overlap:
            raise ValueError(f"layers {overlap} are both streamed and resident; pick one")
        self.streamed_layers = sorted(streamed_layers)
        self.resident_layers = sorted(resident_layers)
        overlap = sorted(set(split_layers) & set(resident_layers))
        if overlap:
            raise ValueError(f"layers {overlap} are resident; they need no split with the CPU")
        self.split_layers = sorted(split_layers) if split_experts > 0 else []
        self.split_experts = split_experts if self.split_layers else 0
        if self.streamed_layers or self.resident_layers:
            from lvgg.vllm_plugin import compat  # vLLM's fused MoE kernel (split layers use lvgg's own)

            self._fused_experts = compat.fused_experts
        self._info: dict[int, ExpertLayerInfo] = {}  # this share's sizes
        shares: dict[int, tuple[ExpertLayerInfo, tuple[int, int], tuple[int, int], tuple[int, int]]] = {}
        for layer in sorted({*self.streamed_layers, *self.resident_layers, *self.split_layers}):
            shares[layer] = _share_of(store, layer, self.part, by)
            why = gpu_unsupported(shares[layer][0])
            if why:
                raise ValueError(f"layer {layer} of {store.path} cannot run on the GPU: {why}")
            self._info[layer] = _share_info(*shares[layer])
        # where each projection is read: a packed copy's (address, bytes), or None for the file
        sources = {_twin(info, p) for info in self._info.values() for p, _ in _gpu_layout(info)}
        self._host = _host_bytes(store.mapped_bytes()) if None in sources else None
        # per layer and projection: (projection, the share's bytes in host memory as _host_views gives
        # them, rows of w13 it fills or None for w2)
        self._plan: dict[int, list[tuple[str, list[torch.Tensor], slice | None]]] = {
            layer: [(p, views, rows) for (p, rows), views in
                    zip(_gpu_layout(info), _host_views(self._host, *shares[layer][:3]))]
            for layer, info in self._info.items()}
        # per layer: the router's id of the first expert in its host views (a part's store: the part's)
        self._views_first = {layer: shares[layer][0].first_expert for layer in self._info}
        # lvgg's packed CPU layout, read from the CPU engine's own copy (the file's pages then stay unread)
        self.reads_packed_copy = bool(sources - {None})
        # what the GPU reads over the link, pinned: the CPU engine's packed copies, the mapped file
        self._host_ranges = sorted(sources - {None}) + \
            ([(self._host.data_ptr(), self._host.numel())] if self._host is not None else [])
        self.host_pinned = False
        self._resident: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}  # w13, w2, map
        self._resident_bytes: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # staged bytes, map
        self._streamed: frozenset[int] = frozenset()
        if self.streamed_layers or self.split_layers:
            self._pin_host()
        if self.streamed_layers:
            self._setup_streaming(stream_group)
        if self.split_layers and not self.host_pinned:
            log.warning("lvgg: decode steps run the experts on the CPU alone: splitting them with the GPU needs the "
                        "experts pinned (see above)")
            self.split_layers, self.split_experts = [], 0
        if self.split_layers:
            self._setup_split()
        t0 = time.perf_counter()
        for layer in self.resident_layers:
            every = self._info[layer].held_experts
            staged = torch.empty(staged_bytes(self._info[layer]), dtype=torch.uint8, device=self.device)
            self._stage(layer, every, staged)
            if quantized_resident:
                self._resident_bytes[layer] = staged, self._expert_map(self._info[layer], every)
            else:
                w13, w2 = self._dequantize(layer, every, staged, self._new_weights(self._info[layer]))
                self._resident[layer] = w13, w2, self._expert_map(self._info[layer], every)
        if self._resident_bytes:  # the weights longer passes dequantize a resident layer into
            info = self._one_shape(self.resident_layers, "resident")
            if _shares_streamed_weights(self._info, self.streamed_layers, self.resident_layers, stream_group):
                self._resident_weights = self._weights
            else:
                self._resident_weights = self._new_weights(info, None, max(self._info[n].down_columns
                                                                           for n in self.resident_layers))
        if self.resident_layers:
            torch.cuda.synchronize(self.device)
            log.info("lvgg: %d resident expert layers %s onto %s in %.1f s", len(self.resident_layers),
                     "copied as their quantized bytes" if quantized_resident else "dequantized", self.device,
                     time.perf_counter() - t0)

    # -- public ---------------------------------------------------------------------------------------

    def layer_info(self, layer: int) -> ExpertLayerInfo:
        """A layer as this share holds it (its rows and experts)."""
        return self._info[layer]

    @property
    def vram_bytes(self) -> int:
        """Device memory held for experts (staging, streamed and resident weights, split layers' bytes)."""
        tensors = [*self._staging, *self._weights] if self.streamed_layers else []
        tensors += [self._fetch_staging] if self.split_layers else []
        tensors += [t for w13, w2, _ in self._resident.values() for t in (w13, w2)]
        tensors += [staged for staged, _ in self._resident_bytes.values()]
        if self._resident_bytes and self._resident_weights is not getattr(self, "_weights", None):
            tensors += [*self._resident_weights]
        return sum(t.untyped_storage().nbytes() for t in tensors)  # a resident w2 is a view of its padded down

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        if layer in self._resident:
            w13, w2, expert_map = self._resident[layer]
            return self._fused_experts(x, w13, w2, topk_weights, topk_ids,
                                       global_num_experts=self._info[layer].routed_experts, expert_map=expert_map)
        if layer in self._resident_bytes:
            staged, expert_map = self._resident_bytes[layer]
            info = self._info[layer]
            if x.shape[0] <= RESIDENT_BYTES_MOST_TOKENS:  # each slot's expert, read from its bytes
                held = info.held_experts
                slot_expert = torch.where((topk_ids >= held.start) & (topk_ids < held.stop), topk_ids - held.start,
                                          -1).to(torch.int32)
                staged_projections = [_staged(info, projection, staged[at:at + nbytes].view(info.n_experts, -1))
                                      for (projection, _, _), (_, nbytes, at) in zip(self._plan[layer], _pieces(info))]
                return _multiply_staged(info, x, sum(staged_projections, []), slot_expert, topk_weights)
            w13, w2 = self._dequantize(layer, info.held_experts, staged, self._resident_weights)
            return self._fused_experts(x, w13, w2, topk_weights, topk_ids, global_num_experts=info.routed_experts,
                                       expert_map=expert_map)
        if layer not in self._streamed:
            raise ValueError(f"layer {layer} is neither streamed nor resident on the GPU "
                             f"(streamed: {self.streamed_layers}, resident: {self.resident_layers})")
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"layer {layer} is streamed, which cannot be captured in a CUDA graph; "
                               "run it eagerly or make it resident")
        out = None
        for group, expert_map in enumerate(self._expert_maps):
            part = self._fused_experts(x, *self._stream_in(layer, group), topk_weights, topk_ids,
                                       global_num_experts=self._info[layer].routed_experts, expert_map=expert_map)
            out = part if out is None else out.add_(part)
        return out

    def fetched(self, layer: int, x: torch.Tensor, experts: torch.Tensor, slot_expert: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """The MoE of ``x`` ([n, hidden]) with some experts of a split layer, as
        ``lvgg.gpu.dequant.split_routing`` shares them out: ``experts`` ([m] int32 on the device,
        m <= split_experts; -1: none) are fetched, each once, from the pinned file and multiplied
        as they are (no dequantized copy); slot [t, j] adds ``topk_weights[t, j]`` times expert
        ``experts[slot_expert[t, j]]`` of x[t], or nothing where slot_expert is -1. In the
        current stream's order: capturable. Returns [n, hidden] in x's dtype."""
        n_fetched = experts.numel()
        if layer not in self.split_layers or experts.dim() != 1 or not 1 <= n_fetched <= self.split_experts:
            raise ValueError(f"fetched() takes 1..{self.split_experts} experts of the split layers "
                             f"{self.split_layers}; asked for {list(experts.shape)} of layer {layer}")
        info = self._info[layer]
        stream = torch.cuda.current_stream(self.device)
        # Projections are fetched in turn on a second stream; gate and up are multiplied as soon as
        # they are in, while the link carries down (the fetch stream first waits for the last call's
        # use of the staging buffer).
        self._link_stream.wait_stream(stream)
        staged = []
        plan = self._plan[layer]
        for i, ((projection, views, _), (_, nbytes, at)) in enumerate(zip(plan, _pieces(info, n_fetched))):
            data = self._fetch_staging[at:at + nbytes].view(n_fetched, -1)
            with torch.cuda.stream(self._link_stream):
                _gather(views, self._views_first[layer], experts, data)
                self._fetched_event[i].record(self._link_stream)
            staged += _staged(info, projection, data)
        for event in self._fetched_event[:len(plan) - 1]:
            stream.wait_event(event)
        return _multiply_staged(info, x, staged, slot_expert, topk_weights,
                                before_down=lambda: stream.wait_event(self._fetched_event[len(plan) - 1]))

    def close(self) -> None:
        """Unpin what the GPU reads (pinned while layers stream or split); the device must be done
        with this object's work (synchronize first). The store must outlive this object until then."""
        if self.host_pinned:
            with _pin_lock:
                for address, _ in self._host_ranges:
                    _unpin(address, self.device)
            self.host_pinned = False

    # -- streaming ------------------------------------------------------------------------------------

    def _pin_host(self) -> None:
        """Register what the GPU reads (the file, the CPU engine's packed copies) with CUDA, as
        one mapped, read-only range each (each GpuExperts of a range counts: CUDA refuses to
        register it twice), its pages read in first (a chunk at a time, in the stores' placement
        progress); on failure nothing stays pinned and copies run from pageable memory."""
        t0, done = time.perf_counter(), []
        with _pin_lock:
            for address, nbytes in self._host_ranges:
                if address not in _pin_users:
                    try:
                        _bridge.read_in(address, nbytes)  # counted as it goes (the runtime's progress lines)
                        register_host(address, nbytes, _HOST_REGISTER_FLAGS, self.device)
                    except (RuntimeError, OSError) as e:
                        for pinned in done:
                            _unpin(pinned, self.device)
                        log.warning("lvgg: could not pin the experts for the GPU (%s; check free RAM and `ulimit -l`): "
                                    "copies will run at a fraction of the link's speed", e)
                        return
                    _pin_users[address] = 0
                _pin_users[address] += 1
                done.append(address)
        what = " and ".join(name for name, reads in (("the CPU engine's packed copy", self.reads_packed_copy),
                                                      ("the experts file", self._host is not None)) if reads)
        log.info("lvgg: %.1f GiB of %s pinned for the GPU in %.1f s", sum(n for _, n in self._host_ranges) / 2**30,
                 what, time.perf_counter() - t0)
        self.host_pinned = True

    def _stage(self, layer: int, experts: range, staging: torch.Tensor) -> None:
        """Copy the bytes of a layer's ``experts`` (this share's) into ``staging`` on the current
        stream, by the copy engine: asynchronous once the file is pinned (a share's as 2-d copies),
        else (resident layers only) a share's gathered on the host first."""
        n, begin = len(experts), experts.start - self._views_first[layer]  # the views' index of experts[0]
        for (_, views, _), (_, nbytes, at) in zip(self._plan[layer], _pieces(self._info[layer], n)):
            data = staging[at:at + nbytes]
            mine = [view[begin:begin + n] for view in views]
            if len(mine) == 1 and mine[0].is_contiguous():  # a whole projection's
                data.copy_(mine[0].view(-1), non_blocking=True)
            elif self.host_pinned:
                _copy_share(mine, data.view(n, -1))
            else:
                data.copy_(torch.cat([m.reshape(n, -1) for m in mine], dim=1).view(-1))

    def _setup_streaming(self, stream_group: int | None) -> None:
        info = self._one_shape(self.streamed_layers, "streamed")
        self._streamed = frozenset(self.streamed_layers)
        held = info.held_experts
        self._groups = [range(held.start + g.start, held.start + g.stop)
                        for g in stream_groups(len(held), stream_group)]
        group = len(self._groups[0])
        slot_bytes = max(staged_bytes(self._info[layer], group) for layer in self.streamed_layers)
        self._staging = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._weights = self._new_weights(info, group, max(self._info[n].down_columns for n in self.streamed_layers))
        self._expert_maps = [self._expert_map(info, experts) for experts in self._groups]
        order = [(layer, group) for layer in self.streamed_layers for group in range(len(self._groups))]
        self._slot_of = {unit: i % 2 for i, unit in enumerate(order)}
        self._next = {unit: order[(i + 1) % len(order)] for i, unit in enumerate(order)}
        self._slot_holds: list[tuple[int, int] | None] = [None, None]
        self._copied = [torch.cuda.Event() for _ in range(2)]
        self._freed = [torch.cuda.Event() for _ in range(2)]
        self._copy_stream = torch.cuda.Stream(self.device)

    def _expert_map(self, info: ExpertLayerInfo, experts: range) -> torch.Tensor | None:
        """What vLLM's fused MoE takes to compute ``experts`` of a layer held as weights 0, 1, ...:
        each of the router's experts' index among them (-1: not held, skipped); None for all."""
        if experts == range(info.routed_experts):
            return None
        return torch.tensor([e - experts.start if e in experts else -1 for e in range(info.routed_experts)],
                            dtype=torch.int32, device=self.device)

    def _one_shape(self, layers: list[int], what: str) -> ExpertLayerInfo:
        """The layer info of ``layers``, which must share their shape (they share weight buffers)."""
        shapes = {(self._info[n].n_experts, self._info[n].first_expert, self._info[n].hidden_size,
                   self._info[n].intermediate_size) for n in layers}
        if len(shapes) > 1:
            raise ValueError(f"{what} layers of {self.store.path} differ in shape ({sorted(shapes)}); "
                             f"give layers of one shape")
        return self._info[layers[0]]

    def _setup_split(self) -> None:
        self._one_shape(self.split_layers, "split")
        n = self.split_experts
        staging = max(_aligned(staged_bytes(self._info[layer], n)) for layer in self.split_layers)
        self._fetch_staging = torch.empty(staging, dtype=torch.uint8, device=self.device)
        self._link_stream = torch.cuda.Stream(self.device)
        self._fetched_event = [torch.cuda.Event() for _ in range(3)]  # one per projection

    def _start_copy(self, unit: tuple[int, int]) -> None:
        """Start copying a (layer, group)'s bytes into its slot on the side stream, unless they are
        there already."""
        slot = self._slot_of[unit]
        if self._slot_holds[slot] == unit:
            return
        layer, group = unit
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._freed[slot])  # the slot's last dequantization is done
            self._stage(layer, self._groups[group], self._staging[slot])
            self._copied[slot].record(self._copy_stream)
        self._slot_holds[slot] = unit

    def _stream_in(self, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of a streamed layer's group of experts, dequantized into the shared buffers
        once copied; starts copying the next group (or layer) meanwhile."""
        unit = (layer, group)
        slot = self._slot_of[unit]
        self._start_copy(unit)
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self._copied[slot])
        w13, w2 = self._dequantize(layer, self._groups[group], self._staging[slot], self._weights)
        self._freed[slot].record(stream)
        self._start_copy(self._next[unit])  # overlaps this group's matmuls
        return w13, w2

    def _new_weights(self, info: ExpertLayerInfo, n_experts: int | None = None,
                     down_columns: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty w13 [n, 2F, D] and w2 [n, D, down_columns] (default: the layer's) for ``n_experts``
        (default: all) of a layer of this shape."""
        n = info.n_experts if n_experts is None else n_experts
        d, f = info.hidden_size, info.intermediate_size
        return (torch.empty(n, 2 * f, d, dtype=self.dtype, device=self.device),
                torch.empty(n, d, down_columns or info.down_columns, dtype=self.dtype, device=self.device))

    def _dequantize(self, layer: int, experts: range, staged: torch.Tensor,
                    out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first len(experts) of ``out``'s weights (vLLM's layout) from those experts' bytes,
        staged as ``_stage`` places them; of a share's padded down, the columns of its rows (a view)."""
        n, info = len(experts), self._info[layer]
        w13, w2 = out
        # streamed layers share a w2 as wide as their widest down (a share's down blocks differ by type)
        w2 = w2.view(-1)[:n * info.hidden_size * info.down_columns].view(n, info.hidden_size, info.down_columns)
        for (projection, _, rows), (_, nbytes, at) in zip(self._plan[layer], _pieces(info, n)):
            dequantize(staged[at:at + nbytes], _type(info, projection), w13[:n, rows] if rows is not None else w2,
                       packed=_twin(info, projection) is not None)
        return w13[:n], w2[:, :, info.down_lead:info.down_lead + info.intermediate_size]
