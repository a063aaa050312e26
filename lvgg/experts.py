"""The routed experts of a GGUF file and the CPU MoE engine that computes them.

    store = lvgg.ExpertStore("experts.gguf")
    moe = lvgg.CpuMoE(store, threads=8)
    out = moe(layer=3, x=hidden, topk_ids=ids, topk_weights=w)   # numpy or torch (CPU)

Both wrap ggml_bridge (C++): the store memory-maps the file and checks every expert tensor;
the engine owns scratch buffers sized at creation and a thread pool (see CpuMoE).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from lvgg import _bridge
from lvgg.gguf_files import resolve


@dataclass(frozen=True)
class ExpertLayerInfo:
    """What one MoE layer of an experts file holds."""

    index: int
    n_experts: int  # held (an expert-parallel part's: its own)
    hidden_size: int
    intermediate_size: int
    form: str  # "gate+up+down", "gate_up+down" (fused, gate rows first) or "up+down"
    biased: bool  # per-expert biases on every projection (gpt-oss)
    types: dict[str, str]  # projection -> ggml type name
    repacked: dict[str, bool]  # projection -> held in an interleaved CPU layout (ggml's or lvgg's)
    packed: dict[str, bool]  # projection -> in lvgg's own layout, run by its AVX-512 VNNI kernels
    offsets: dict[str, int]  # projection -> offset of its bytes in the file
    nbytes: int
    first_expert: int  # the router's index of the first expert held
    routed_experts: int  # experts the router picks from (a whole layer's n_experts)
    down_columns: int  # of down: intermediate_size, or a rows part's whole quant blocks around its rows
    down_lead: int  # down's columns start this many intermediate rows before the first held (a rows part's)
    # projection -> (address, bytes of whole pages) of its packed copy, where ``packed`` (separate
    # gate and up of one type share one: gate rows then up rows of each expert)
    twins: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def held_experts(self) -> range:
        """The experts held, as the router numbers them."""
        return range(self.first_expert, self.first_expert + self.n_experts)


def packs_every_expert(path: str | os.PathLike[str], layers: Sequence[int] | None = None,
                       own_kernels: bool = True) -> bool:
    """A repacking ExpertStore of this file (``layers``: those only) holds every expert tensor in
    lvgg's packed layout on this machine (the kernels built for its CPU, ``own_kernels`` on; the
    same test the store makes per tensor), read from the file's header alone."""
    from lvgg.inspect_gguf import inspect_gguf

    if not own_kernels:
        return False
    for s in inspect_gguf(path).layers:
        if layers is not None and s.layer not in layers:
            continue
        d, f = s.hidden_size, s.intermediate_size
        shapes = {"gate": (f, d), "up": (f, d), "gate_up": (2 * f, d), "down": (d, f)}
        if not all(_bridge.packable(_bridge.type_from_name(t), *shapes[p]) for p, t in s.types.items()):
            return False
    return True


class ExpertStore:
    """A GGUF file's routed experts (``blk.N.ffn_{gate,up,down}_exps.weight``), memory-mapped.

    ``path``: an experts file made by ``lvgg convert`` or any llama.cpp GGUF as it is (its other
    tensors are never read), the first part of a split GGUF (all parts are mapped end to end), or
    a Hub quant ``org/repo:QUANT`` (lvgg.gguf_files.resolve).

    ``repack=True`` copies the types ggml has interleaved CPU kernels for (Q4_0, Q4_K,
    Q5_K, Q6_K, IQ4_NL, ... depending on the CPU) into that layout; the others are used in
    place from the mapping; separate gate and up of one type are repacked together, as one
    fused gate_up (one matmul per layer instead of two, and x quantized once; on a 2-core AVX2
    machine 3-4% faster at 1-4 tokens, about that machine's noise). The repacked kernels are
    faster for few tokens per call (decode)
    but, for K-quants, about 2x slower for hundreds; ``keep_mapped=True`` keeps both layouts
    resident (twice the memory of the repacked tensors) so the engine uses the faster one
    for each batch size. ``layers`` keeps those MoE layers only (a pipeline-parallel rank's):
    the others are checked in the header, never read.

    ``repack=True`` puts the types lvgg's own kernels run (rows a multiple of 16) into lvgg's packed
    layout instead of ggml's (about the file's size; ``layer_info(n).packed`` says which): Q2_K-Q6_K,
    IQ4_XS, IQ4_NL, MXFP4, Q8_0 and Q4_0, on CPUs with AVX-512 VNNI or AVX2, and IQ2_XXS, IQ2_XS,
    IQ2_S, IQ3_XXS and IQ3_S on CPUs with AVX-512 VNNI and VBMI
    (ggml_bridge/src/vnni_kquants.h). They beat both
    ggml layouts at every batch size measured, so the engine runs them for every batch (with
    ``keep_mapped=True`` too); ``own_kernels=False`` keeps ggml's.
    """

    def __init__(self, path: str | os.PathLike[str], *, repack: bool = True, keep_mapped: bool = False,
                 layers: Sequence[int] | None = None, own_kernels: bool = True) -> None:
        files = resolve(path)
        for f in files:
            if not os.access(f, os.R_OK):
                raise PermissionError(f"experts file is not readable: {f}")
        if layers is not None and not layers:
            raise ValueError("layers must name at least one MoE layer (None: all of them)")
        self._store = _bridge.ExpertStore([os.fspath(f) for f in files], repack, keep_mapped, list(layers or []),
                                          own_kernels)

    def part(self, part: int, n_parts: int, repack: bool = True, by: str = "rows") -> ExpertStore:
        """Part ``part`` of ``n_parts`` of every layer, as a store of its own, copied into memory
        this thread touches first (and repacked; ``repack=False`` keeps plain copies, which can be
        split again). ``by="rows"``: a share of every expert, intermediate rows ``part_rows`` of
        gate/up (vLLM's tensor-parallel share: units of 32) and the whole quant blocks of down
        around them, its activations zero-padded to those blocks (the fewest bytes per part: NUMA
        nodes, ranks on nodes of their own). ``by="blocks"``: rows in whole blocks of down, parts a
        block apart in size (the fewest bytes in all: ranks sharing a node's memory).
        ``by="experts"``: whole experts (``expert_range``; an expert-parallel rank's); its engine
        takes the router's expert indices and leaves out the experts it does not hold. Either way
        the outputs of all parts' engines sum to the whole layer's."""
        if not 0 <= part < n_parts:
            raise ValueError(f"part must be in 0..{n_parts - 1}, found {part}")
        store = ExpertStore.__new__(ExpertStore)
        store._store = _bridge.ExpertStore.part(self._store, part, n_parts, repack, by)
        return store

    def part_shape(self, layer: int, part: int, n_parts: int,
                   by: str = "rows") -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """What ``part(part, n_parts, by=by)`` holds of ``layer``, each as [begin, end): its
        intermediate rows of gate and up, its columns of down (whole quant blocks around the rows:
        the part pads its activations with zeros to them) and its experts, as the router numbers
        them (by experts: as evenly as they go, the first parts one more, vLLM's linear placement)."""
        rows, columns, experts = self._store.part_shape(layer, part, n_parts, by)  # checks the part and layer
        return tuple(rows), tuple(columns), tuple(experts)

    def part_rows(self, layer: int, part: int, n_parts: int, by: str = "rows") -> tuple[int, int]:
        """The intermediate rows [begin, end) ``part(part, n_parts, by=by)`` holds (``part_shape``)."""
        return self.part_shape(layer, part, n_parts, by)[0]

    def expert_range(self, layer: int, part: int, n_parts: int) -> tuple[int, int]:
        """The experts [begin, end) ``part(part, n_parts, by="experts")`` holds (``part_shape``)."""
        return self.part_shape(layer, part, n_parts, "experts")[2]

    def part_bytes(self, part: int, n_parts: int, by: str = "rows") -> int:
        """The expert bytes ``part(part, n_parts, by=by)`` would hold."""
        return self._store.part_bytes(part, n_parts, by)

    def max_parts(self, by: str = "rows") -> int:
        """The most parts (NUMA nodes, tensor- or expert-parallel ranks) every layer can be split
        into ``by`` rows, blocks or experts."""
        return self._store.max_parts(by)

    @property
    def path(self) -> str:
        return self._store.path

    @property
    def architecture(self) -> str:
        """``general.architecture`` of the file ('' when absent)."""
        return self._store.architecture

    @property
    def layers(self) -> list[int]:
        """Indices of the layers that have routed experts, ascending."""
        return self._store.layers

    @property
    def file_size(self) -> int:
        return self._store.file_size

    @property
    def expert_bytes(self) -> int:
        """Bytes of the routed experts of every layer this store holds (a part's: its share)."""
        return sum(self.layer_info(layer).nbytes for layer in self.layers)

    def layer_info(self, layer: int) -> ExpertLayerInfo:
        d = self._store.layer_info(layer)
        return ExpertLayerInfo(
            index=d["index"], n_experts=d["n_expert"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], form=d["form"], biased=d["biased"], types=dict(d["types"]),
            repacked=dict(d["repacked"]), packed=dict(d["packed"]), offsets=dict(d["offsets"]), nbytes=d["nbytes"],
            first_expert=d["first_expert"], routed_experts=d["routed_experts"], down_columns=d["down_columns"],
            down_lead=d["down_lead"], twins={p: tuple(t) for p, t in d["twins"].items()})

    def mapped_bytes(self) -> memoryview:
        """The whole file as mapped (read-only; valid while this store lives).

        Where a tensor is also repacked and ``keep_mapped`` is off, its pages are read back from
        the page cache (or the disk) on access.
        """
        address = self._store.mapping_address
        if not address:
            raise ValueError(f"{self.path} is not mapped: it holds no expert tensors, or it is a part (ExpertStore.part)")
        return memoryview((ctypes.c_uint8 * self.file_size).from_address(address)).cast("B").toreadonly()

    def metadata(self) -> dict[str, Any]:
        """The file's key/value metadata (arrays as ``("array", length, first_strings)``)."""
        return self._store.metadata()

    def check_layer(self, layer: int, *, n_experts: int | None = None, hidden_size: int | None = None,
                    intermediate_size: int | None = None) -> ExpertLayerInfo:
        """Raise ValueError naming the first difference between the file and what the caller expects."""
        info = self.layer_info(layer)
        for name, want in (("n_experts", n_experts), ("hidden_size", hidden_size),
                           ("intermediate_size", intermediate_size)):
            have = info.routed_experts if name == "n_experts" else getattr(info, name)  # a part's: the model's
            if want is not None and have != want:
                raise ValueError(f"{self.path}: layer {layer} has {name}={have}, the model expects {want}; "
                                 "this experts file was made for another model")
        return info

    def __repr__(self) -> str:
        return f"ExpertStore({self.path!r}, layers={len(self.layers)}, architecture={self.architecture!r})"


@dataclass(frozen=True)
class EngineNode:
    """One NUMA node of a CpuMoE: its CPUs (its threads run there, one per CPU unless
    ``threads`` says fewer; no CPUs: ``threads`` unbound threads) and the NUMA node whose memory
    holds its part of the experts (None: the memory local to its CPUs)."""

    cpus: Sequence[int]
    threads: int | None = None
    mem_node: int | None = None


def _check_cpu(name: str, a: Any) -> Any:
    device = getattr(a, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        raise TypeError(f"{name} is on {device}; the CPU MoE engine takes CPU tensors")
    if getattr(a, "requires_grad", False):
        a = a.detach()
    return a


class CpuMoE:
    """Routed experts of one layer at a time on the CPU through ggml.

    ``out[t] = sum_k topk_weights[t, k] * down_e(act(gate_e(x[t])) * up_e(x[t]))`` with
    ``e = topk_ids[t, k]``. x and out: [T, D] float32/float16/bfloat16; topk_ids: [T, K]
    int32/int64, -1 for a slot without an expert (it adds nothing: e.g. the slots of experts a
    caller computes elsewhere); topk_weights: [T, K] float. lvgg's own kernels and the
    per-expert schedule skip such slots; ggml's MUL_MAT_ID computes a stand-in expert for them
    with weight 0 (an expert the call reads anyway where there is one). All C-contiguous CPU
    arrays (numpy, torch or any DLPack producer), read and written in place.

    threads: default one per physical core of ``cpus`` (default: the process's CPU set). Built
        without a GPU driver they are the calling thread's OpenMP team, shared with torch's CPU
        ops; otherwise ggml's own pool (``lvgg._bridge.openmp`` says which). Idle threads spin
        briefly, then sleep.
    cpus: pin the threads to these CPUs (strict_cpu: one CPU per thread); default: no pinning.
    nodes: two or more EngineNode: one engine per NUMA node, each holding its share of every
        expert's intermediate dimension (units of 32 rows) in its node's memory, computing a
        partial output with its own threads; the parts are summed. The parts are copies (made at
        creation, repacked when ``repack``): open the store with ``repack=False`` so that it does
        not hold repacked copies of its own. One EngineNode is the same as threads=/cpus=.
    chunk: tokens per ggml graph; longer inputs (up to max_tokens) run chunk by chunk.
    repack_max_tokens: chunks up to this size use the repacked weights when the store keeps
        both layouts (``keep_mapped=True``), larger ones the mapped weights; None: per type,
        as measured (K-quants: 96 tokens; Q4_0, IQ4_NL, ...: always repacked).
    schedule: "mul_mat_id" (one ggml op per projection for all experts), "per_expert" (tokens
        grouped by expert, one plain matmul per expert: reaches llamafile's sgemm; needs the
        mapped weights, so repack=False or keep_mapped=True) or "auto": per-expert for chunks of
        >= 256 tokens of Q4_0/Q8_0 and >= 512 of F16/BF16 when the mapped weights are there,
        MUL_MAT_ID otherwise (measured on a 16-core AVX-512 Xeon).
    activation: "silu" (SwiGLU), "gelu" (GeGLU, tanh form), "swigluoai" (gpt-oss's clamped SwiGLU,
        alpha 1.702, limit 7), "swiglustep" (Step-3.5's: silu(gate) at most 7, up within [-7, 7]) or
        "relu2" for up/down-only experts: every layer's, unless ``set_activation`` sets one's.
    """

    def __init__(self, store: ExpertStore, *, threads: int | None = None, cpus: Sequence[int] | None = None,
                 strict_cpu: bool = False, nodes: Sequence[EngineNode] | None = None, repack: bool = True,
                 max_tokens: int = 8192, max_top_k: int = 8, chunk: int = 512, repack_max_tokens: int | None = None,
                 schedule: str = "auto", activation: str = "silu") -> None:
        self.store = store
        self.activation = activation
        settings = dict(max_tokens=max_tokens, max_top_k=max_top_k, chunk=chunk,
                        repack_max_tokens=-1 if repack_max_tokens is None else repack_max_tokens,
                        schedule=schedule, activation=activation)
        self.nodes = tuple(nodes or ())
        if len(self.nodes) > 1:
            if threads or cpus:
                raise ValueError("give threads and CPUs per node (EngineNode), not threads=/cpus=, with nodes=")
            homes = {n.mem_node for n in self.nodes} - {None}
            if homes:
                from lvgg.topology import read_machine

                machine = read_machine()
                for home in sorted(homes):
                    machine.node(home)  # ValueError naming the machine's nodes
            self._engine = _bridge.SplitEngine(
                store._store, [list(n.cpus) for n in self.nodes], [n.threads or 0 for n in self.nodes],
                [-1 if n.mem_node is None else n.mem_node for n in self.nodes], strict_cpu, repack, **settings)
            self._threads = sum(self._engine.node_threads(i) for i in range(len(self.nodes)))
            self._cpus = [c for i in range(len(self.nodes)) for c in self._engine.node_cpus(i)]
        else:
            if self.nodes:
                threads, cpus = self.nodes[0].threads, self.nodes[0].cpus
            self._engine = _bridge.MoeEngine(store._store, threads or 0, list(cpus or []), strict_cpu, **settings)
            self._threads, self._cpus = self._engine.threads, self._engine.cpus

    @property
    def threads(self) -> int:
        """Threads of all nodes together."""
        return self._threads

    @property
    def cpus(self) -> list[int]:
        return self._cpus

    @property
    def max_tokens(self) -> int:
        return self._engine.max_tokens

    @property
    def max_top_k(self) -> int:
        return self._engine.max_top_k

    def set_activation(self, layer: int, activation: str) -> None:
        """``layer``'s activation from now on (before its first call), for models whose layers differ
        (Step-3.5); a gated layer takes any gated activation."""
        self._engine.set_activation(layer, activation)

    def activation_of(self, layer: int) -> str:
        return self._engine.activation_of(layer)

    def call_stats(self) -> dict[str, Any]:
        """Its calls so far (CUDA-graph replays through CudaExperts included): ``counts`` by duration
        (per bucket of ``bounds``, in seconds; the last above them all), ``seconds`` and ``tokens`` in all."""
        return self._engine.stats()

    def node_intermediate_size(self, node: int, layer: int) -> int:
        """Rows of every expert's intermediate dimension ``node`` holds in ``layer``."""
        if len(self.nodes) < 2:
            return self.store.layer_info(layer).intermediate_size
        return self._engine.node_intermediate(node, layer)

    def __call__(self, layer: int, x: Any, topk_ids: Any, topk_weights: Any, out: Any = None) -> Any:
        x = _check_cpu("x", x)
        topk_ids = _check_cpu("topk_ids", topk_ids)
        topk_weights = _check_cpu("topk_weights", topk_weights)
        if out is None:
            out = _empty_like(x)
        else:
            out = _check_cpu("out", out)
        self._engine.forward(layer, x, topk_ids, topk_weights, out)
        return out


def _empty_like(x: Any) -> Any:
    if type(x).__module__.startswith("torch"):
        import torch

        return torch.empty_like(x, memory_format=torch.contiguous_format)
    import numpy as np

    return np.empty_like(x, order="C")
