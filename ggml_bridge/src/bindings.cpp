// Python binding of the bridge (module lvgg._bridge). Arrays arrive through DLPack
// (numpy, torch, ...) without copies; every check happens before ggml sees them.
#include "cuda_bridge.h"
#include "errors.h"
#include "expert_store.h"
#include "membw.h"
#include "moe_engine.h"
#include "quantize.h"
#include "split_engine.h"
#include "threads.h"
#include "vnni_kquants.h"

#include <algorithm>
#include <ggml-cpu.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace lvgg {
namespace {

using AnyArray = nb::ndarray<nb::device::cpu>;

ggml_type ggml_type_of(const nb::dlpack::dtype & dt, const char * what) {
    using code = nb::dlpack::dtype_code;
    if (dt.lanes == 1) {
        if (dt.code == (uint8_t) code::Float && dt.bits == 32) return GGML_TYPE_F32;
        if (dt.code == (uint8_t) code::Float && dt.bits == 16) return GGML_TYPE_F16;
        if (dt.code == (uint8_t) code::Bfloat && dt.bits == 16) return GGML_TYPE_BF16;
        if (dt.code == (uint8_t) code::Int && dt.bits == 32) return GGML_TYPE_I32;
        if (dt.code == (uint8_t) code::Int && dt.bits == 64) return GGML_TYPE_I64;
    }
    static const char * kinds[] = { "int", "uint", "float", "opaque", "bfloat", "complex", "bool" };
    const std::string kind = dt.code < 7 ? kinds[dt.code] : "code" + std::to_string(dt.code);
    fail(ErrorKind::Type, std::string(what) + " has dtype " + kind + std::to_string(dt.bits) +
                              (dt.lanes != 1 ? "x" + std::to_string(dt.lanes) : "") +
                              ", which the CPU MoE engine does not take (floats: float32, float16, bfloat16; "
                              "expert ids: int32, int64)");
}

// A 2-D, C-contiguous CPU array as a Matrix; anything else is a clear error.
Matrix as_matrix(const AnyArray & a, const char * what) {
    if (a.ndim() != 2) {
        fail(ErrorKind::Value, std::string(what) + " must be 2-D, found " + std::to_string(a.ndim()) + "-D");
    }
    Matrix m;
    m.type = ggml_type_of(a.dtype(), what);
    m.rows = (int64_t) a.shape(0);
    m.cols = (int64_t) a.shape(1);
    const bool contiguous = (m.cols <= 1 || a.stride(1) == 1) && (m.rows <= 1 || a.stride(0) == m.cols);
    if (!contiguous) {
        fail(ErrorKind::Value, std::string(what) + " must be C-contiguous (call .contiguous() / np.ascontiguousarray)");
    }
    m.data = a.data();
    return m;
}

EngineConfig engine_config(int threads, std::vector<int> cpus, bool strict_cpu, int64_t max_tokens, int64_t max_top_k,
                           int64_t chunk, int64_t repack_max_tokens, const std::string & schedule,
                           const std::string & activation) {
    EngineConfig cfg;
    cfg.n_threads         = threads;
    cfg.cpus              = std::move(cpus);
    cfg.strict_cpu        = strict_cpu;
    cfg.max_tokens        = max_tokens;
    cfg.max_top_k         = max_top_k;
    cfg.chunk             = chunk;
    cfg.repack_max_tokens = repack_max_tokens;
    cfg.schedule          = parse_schedule(schedule);
    cfg.activation        = parse_activation(activation);
    return cfg;
}

Split split_named(const std::string & by) {
    if (by != "rows" && by != "blocks" && by != "experts") {
        fail(ErrorKind::Value, "by must be 'rows', 'blocks' or 'experts', found '" + by + "'");
    }
    return by == "rows" ? Split::Rows : by == "blocks" ? Split::Blocks : Split::Experts;
}

nb::dict layer_info(const ExpertStore & s, const ExpertLayer & L) {
    nb::dict d;
    d["index"]        = L.index;
    d["n_expert"]     = L.n_expert;
    d["first_expert"] = L.first_expert;
    d["routed_experts"] = L.routed_experts;
    d["hidden_size"]  = L.n_embd;
    d["intermediate_size"] = L.n_ff;
    d["down_columns"] = L.down_cols();
    d["down_lead"]    = L.down_lead;
    d["form"]         = L.gate_up ? "gate_up+down" : L.gate ? "gate+up+down" : "up+down";
    d["biased"]       = L.in_bias != nullptr;
    nb::dict types, repacked, packed, offsets, twins;
    size_t   bytes = 0;
    const char * names[4] = { "gate", "up", "gate_up", "down" };
    ggml_tensor * ts[4]   = { L.gate, L.up, L.gate_up, L.down };
    for (int i = 0; i < 4; ++i) {
        if (ts[i]) {
            types[names[i]]    = ggml_type_name(ts[i]->type);
            const ggml_tensor * twin = s.repacked(ts[i]);
            repacked[names[i]] = twin != nullptr;
            packed[names[i]]   = s.packed(twin);
            if (s.packed(twin)) {  // the packed twin's pages (gate and up may share one: one address)
                twins[names[i]] = nb::make_tuple((uintptr_t) twin->data, ExpertStore::twin_pages(twin));
            }
            if (s.mapping()) {  // a part (ExpertStore.part) has copies, not offsets in a file
                offsets[names[i]] = (size_t) ((const char *) ts[i]->data - (const char *) s.mapping());
            }
            bytes += ggml_nbytes(ts[i]);
        }
    }
    d["types"]    = types;
    d["repacked"] = repacked;
    d["packed"]   = packed;
    d["offsets"]  = offsets;
    d["twins"]    = twins;
    d["nbytes"]   = bytes;
    return d;
}

void check_packed_layout(int t, int64_t rows, int64_t cols) {
    if (t < 0 || t >= GGML_TYPE_COUNT || !vnni::layout_fits((ggml_type) t, rows, cols)) {
        const std::string type = t < 0 || t >= GGML_TYPE_COUNT ? std::to_string(t) : ggml_type_name((ggml_type) t);
        fail(ErrorKind::Value, "no packed layout for a " + std::to_string(rows) + "x" + std::to_string(cols) + " " +
                                   type + " matrix: Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS (columns a multiple of 256) or Q8_0/Q4_0/IQ4_NL/MXFP4 (of 32), "
                                   "rows a multiple of 16");
    }
}

nb::object kv_value(const gguf_context * g, int64_t i) {
    switch (gguf_get_kv_type(g, i)) {
        case GGUF_TYPE_UINT8: return nb::int_(gguf_get_val_u8(g, i));
        case GGUF_TYPE_INT8: return nb::int_(gguf_get_val_i8(g, i));
        case GGUF_TYPE_UINT16: return nb::int_(gguf_get_val_u16(g, i));
        case GGUF_TYPE_INT16: return nb::int_(gguf_get_val_i16(g, i));
        case GGUF_TYPE_UINT32: return nb::int_(gguf_get_val_u32(g, i));
        case GGUF_TYPE_INT32: return nb::int_(gguf_get_val_i32(g, i));
        case GGUF_TYPE_UINT64: return nb::int_(gguf_get_val_u64(g, i));
        case GGUF_TYPE_INT64: return nb::int_(gguf_get_val_i64(g, i));
        case GGUF_TYPE_FLOAT32: return nb::float_(gguf_get_val_f32(g, i));
        case GGUF_TYPE_FLOAT64: return nb::float_(gguf_get_val_f64(g, i));
        case GGUF_TYPE_BOOL: return nb::bool_(gguf_get_val_bool(g, i));
        case GGUF_TYPE_STRING: return nb::str(gguf_get_val_str(g, i));
        case GGUF_TYPE_ARRAY: {
            nb::list out;
            const size_t n = gguf_get_arr_n(g, i);
            if (gguf_get_arr_type(g, i) == GGUF_TYPE_STRING) {
                for (size_t j = 0; j < n && j < 64; ++j) out.append(nb::str(gguf_get_arr_str(g, i, j)));
            }
            return nb::make_tuple(nb::str("array"), nb::int_(n), out);
        }
        default: return nb::none();
    }
}

}  // namespace
}  // namespace lvgg

NB_MODULE(_bridge, m) {
    using namespace lvgg;
    m.doc() = "lvgg's C++ bridge: expert store and CPU MoE engine on ggml";
    // Objects still referenced when the interpreter exits (by vLLM's workers' modules, torch's
    // compiled graphs) are not freed, by design of Python's shutdown: nanobind would list each.
    nb::set_leak_warnings(false);
    ggml_cpu_init();
    install_ggml_log_capture();

    nb::register_exception_translator([](const std::exception_ptr & p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const Error & e) {
            PyObject * type = PyExc_RuntimeError;
            switch (e.kind()) {
                case ErrorKind::Value: type = PyExc_ValueError; break;
                case ErrorKind::Type: type = PyExc_TypeError; break;
                case ErrorKind::Index: type = PyExc_IndexError; break;
                case ErrorKind::File: type = PyExc_OSError; break;
                case ErrorKind::Runtime: type = PyExc_RuntimeError; break;
            }
            PyErr_SetString(type, e.what());
        }
    });

    m.def("placement_progress",
          [] { return std::make_pair(PlacementProgress::done.load(), PlacementProgress::total.load()); },
          "(bytes placed, bytes to place) of expert tensors by every store this process made or is making "
          "(mapped, copied into parts, repacked): poll it from another thread during a long start");

    nb::class_<ExpertStore>(m, "ExpertStore")
        .def("__init__",
             [](ExpertStore * self, std::vector<std::string> paths, bool repack, bool keep_mapped,
                std::vector<int> only_layers, bool own_kernels) {
                 nb::gil_scoped_release release;
                 new (self) ExpertStore(paths, repack, keep_mapped, only_layers, own_kernels);
             },
             "paths"_a, "repack"_a = true, "keep_mapped"_a = false, "only_layers"_a = std::vector<int>{},
             "own_kernels"_a = true)
        .def_static("check_files",
                    [](std::vector<std::string> paths) {
                        ExpertStore::Headers h;
                        {
                            nb::gil_scoped_release release;
                            h = ExpertStore::check_files(paths);
                        }
                        nb::dict layers;
                        for (const auto & [index, dims] : h.layers) {
                            layers[nb::int_(index)] = nb::make_tuple(dims[0], dims[1], dims[2], dims[3] != 0);
                        }
                        return nb::make_tuple(h.architecture, layers);
                    },
                    "paths"_a)
        .def_prop_ro("keeps_mapped", &ExpertStore::keeps_mapped)
        .def_prop_ro("path", &ExpertStore::path)
        .def_prop_ro("architecture", &ExpertStore::architecture)
        .def_prop_ro("file_size", &ExpertStore::file_size)
        .def_prop_ro("mapping_address", [](const ExpertStore & s) { return (uintptr_t) s.mapping(); })
        .def_prop_ro("n_tensors", &ExpertStore::n_tensors)
        .def("max_parts", [](const ExpertStore & s, const std::string & by) { return s.max_parts(split_named(by)); },
             "by"_a = "rows")
        .def_prop_ro("layers",
                     [](const ExpertStore & s) {
                         std::vector<int> out;
                         for (const auto & kv : s.layers()) out.push_back(kv.first);
                         return out;
                     })
        .def("layer_info", [](const ExpertStore & s, int i) { return layer_info(s, s.layer(i)); }, "layer"_a)
        .def("part_shape",  // (rows, columns of down, experts as the router numbers them), each [begin, end)
             [](const ExpertStore & s, int layer, int part, int n_parts, const std::string & by) {
                 const ExpertLayer & L     = s.layer(layer);
                 const PartShape     shape = ExpertStore::part_shape(L, part, n_parts, split_named(by));
                 const auto [e0, e1]       = shape.experts;
                 return std::make_tuple(shape.rows, shape.columns,
                                        std::make_pair(L.first_expert + e0, L.first_expert + e1));
             },
             "layer"_a, "part"_a, "n_parts"_a, "by"_a = "rows")
        .def("part_bytes",
             [](const ExpertStore & s, int part, int n_parts, const std::string & by) {
                 return s.part_bytes(part, n_parts, split_named(by));
             },
             "part"_a, "n_parts"_a, "by"_a = "rows")
        .def("metadata", [](const ExpertStore & s) {
            nb::dict d;
            for (int64_t i = 0; s.gguf() && i < gguf_get_n_kv(s.gguf()); ++i) {
                d[gguf_get_key(s.gguf(), i)] = kv_value(s.gguf(), i);
            }
            return d;
        })
        .def_static("part",
                    [](std::shared_ptr<ExpertStore> whole, int part, int n_parts, bool repack, const std::string & by) {
                        const Split split = split_named(by);
                        nb::gil_scoped_release release;
                        return std::make_shared<ExpertStore>(*whole, part, n_parts, repack, split);
                    },
                    "whole"_a, "part"_a, "n_parts"_a, "repack"_a = true, "by"_a = "rows");

    nb::class_<Experts>(m, "Experts")
        .def("forward",
             [](Experts & e, int layer, AnyArray x, AnyArray ids, AnyArray weights, AnyArray out) {
                 const Matrix mx = as_matrix(x, "x"), mi = as_matrix(ids, "topk_ids"),
                              mw = as_matrix(weights, "topk_weights"), mo = as_matrix(out, "out");
                 nb::gil_scoped_release release;
                 e.forward(layer, mx, mi, mw, mo);
             },
             "layer"_a, "x"_a, "topk_ids"_a, "topk_weights"_a, "out"_a)
        .def_prop_ro("caller_cpus", &Experts::caller_cpus)
        .def("set_activation",
             [](Experts & e, int layer, const std::string & name) { e.set_activation(layer, parse_activation(name)); },
             "layer"_a, "activation"_a, "One layer's activation from now on (before the first forward)")
        .def("activation_of", [](const Experts & e, int layer) { return std::string(activation_name(e.activation(layer))); },
             "layer"_a)
        .def("stats",
             [](const Experts & e) {
                 const CallStats::Snapshot s = e.stats.snapshot();
                 nb::dict d;
                 d["bounds"]  = std::vector<double>(CallStats::bounds.begin(), CallStats::bounds.end());
                 d["counts"]  = s.counts;
                 d["seconds"] = s.seconds;
                 d["tokens"]  = s.tokens;
                 return d;
             },
             "The calls of forward() so far: counts by duration (per bucket of `bounds`, seconds; the last "
             "above them all), their seconds and tokens in all");

    nb::class_<MoeEngine, Experts>(m, "MoeEngine")
        .def("__init__",
             [](MoeEngine * self, std::shared_ptr<ExpertStore> store, int threads, std::vector<int> cpus,
                bool strict_cpu, int64_t max_tokens, int64_t max_top_k, int64_t chunk, int64_t repack_max_tokens,
                const std::string & schedule, const std::string & activation) {
                 EngineConfig cfg = engine_config(threads, std::move(cpus), strict_cpu, max_tokens, max_top_k, chunk,
                                                  repack_max_tokens, schedule, activation);
                 new (self) MoeEngine(std::move(store), cfg);
             },
             "store"_a, "threads"_a = 0, "cpus"_a = std::vector<int>(), "strict_cpu"_a = false,
             "max_tokens"_a = 8192, "max_top_k"_a = 8, "chunk"_a = 512, "repack_max_tokens"_a = -1,
             "schedule"_a = "auto", "activation"_a = "silu")
        .def_prop_ro("threads", [](const MoeEngine & e) { return e.pool().n_threads(); })
        .def_prop_ro("cpus", [](const MoeEngine & e) { return e.pool().cpus(); })
        .def_prop_ro("activation", [](const MoeEngine & e) { return std::string(activation_name(e.config().activation)); })
        .def_prop_ro("max_tokens", [](const MoeEngine & e) { return e.config().max_tokens; })
        .def_prop_ro("max_top_k", [](const MoeEngine & e) { return e.config().max_top_k; })
        .def_prop_ro("chunk", [](const MoeEngine & e) { return e.config().chunk; })
        .def_prop_ro("schedule", [](const MoeEngine & e) { return std::string(schedule_name(e.config().schedule)); })
        .def_prop_ro("repack_max_tokens", [](const MoeEngine & e) { return e.config().repack_max_tokens; })
        .def_prop_ro("scratch_bytes", &MoeEngine::scratch_bytes)
        .def_prop_ro("store", &MoeEngine::store);

    nb::class_<SplitEngine, Experts>(m, "SplitEngine")
        .def("__init__",
             [](SplitEngine * self, std::shared_ptr<ExpertStore> store, std::vector<std::vector<int>> node_cpus,
                std::vector<int> node_threads, std::vector<int> mem_nodes, bool strict_cpu, bool repack,
                int64_t max_tokens, int64_t max_top_k, int64_t chunk, int64_t repack_max_tokens,
                const std::string & schedule, const std::string & activation) {
                 if (node_threads.size() != node_cpus.size() || mem_nodes.size() != node_cpus.size()) {
                     fail(ErrorKind::Value, "node_cpus, node_threads and mem_nodes must have one entry per node");
                 }
                 std::vector<NodePlan> plans(node_cpus.size());
                 for (size_t i = 0; i < plans.size(); ++i) {
                     plans[i] = { node_cpus[i], node_threads[i], mem_nodes[i] };
                 }
                 EngineConfig cfg = engine_config(0, {}, strict_cpu, max_tokens, max_top_k, chunk, repack_max_tokens,
                                                  schedule, activation);
                 nb::gil_scoped_release release;
                 new (self) SplitEngine(std::move(store), plans, cfg, repack);
             },
             "store"_a, "node_cpus"_a, "node_threads"_a, "mem_nodes"_a, "strict_cpu"_a = false, "repack"_a = true,
             "max_tokens"_a = 8192, "max_top_k"_a = 8, "chunk"_a = 512, "repack_max_tokens"_a = -1,
             "schedule"_a = "auto", "activation"_a = "silu")
        .def_prop_ro("n_nodes", &SplitEngine::n_nodes)
        .def("node_threads", [](const SplitEngine & e, int i) { return e.node(i).pool().n_threads(); }, "node"_a)
        .def("node_cpus", [](const SplitEngine & e, int i) { return e.node(i).pool().cpus(); }, "node"_a)
        .def("node_intermediate", [](const SplitEngine & e, int i, int layer) {
            return e.node(i).store()->layer(layer).n_ff;
        }, "node"_a, "layer"_a)
        .def("part_memory", &SplitEngine::part_memory, "node"_a)
        .def_prop_ro("max_tokens", [](const SplitEngine & e) { return e.config().max_tokens; })
        .def_prop_ro("max_top_k", [](const SplitEngine & e) { return e.config().max_top_k; });

    nb::class_<CudaBridge>(m, "CudaBridge")
        .def("__init__",
             [](CudaBridge * self, Experts & engine, AnyArray x, AnyArray ids, AnyArray weights, AnyArray out,
                std::optional<AnyArray> signals, std::optional<AnyArray> real_rows) {
                 uint32_t * request = nullptr;
                 if (signals) {  // two words 64 bytes apart: a cache line each
                     const Matrix m = as_matrix(*signals, "signals");
                     if (m.type != GGML_TYPE_I32 || m.rows * m.cols < 32) {
                         fail(ErrorKind::Value, "signals must be 32 or more int32 words of pinned, mapped memory");
                     }
                     request = (uint32_t *) m.data;
                 }
                 const int32_t * rows = nullptr;
                 if (real_rows) {
                     const Matrix m = as_matrix(*real_rows, "real_rows");
                     if (m.type != GGML_TYPE_I32 || m.rows * m.cols < 1) {
                         fail(ErrorKind::Value, "real_rows must be an int32 word of pinned memory");
                     }
                     rows = (const int32_t *) m.data;
                 }
                 new (self) CudaBridge(engine, as_matrix(x, "x"), as_matrix(ids, "topk_ids"),
                                       as_matrix(weights, "topk_weights"), as_matrix(out, "out"), request,
                                       request ? request + 16 : nullptr, rows);
             },
             "engine"_a, "x"_a, "topk_ids"_a, "topk_weights"_a, "out"_a, "signals"_a = nb::none(),
             "real_rows"_a = nb::none(), nb::keep_alive<1, 2>(), nb::keep_alive<1, 3>(), nb::keep_alive<1, 4>(),
             nb::keep_alive<1, 5>(), nb::keep_alive<1, 6>(), nb::keep_alive<1, 7>(), nb::keep_alive<1, 8>())
        .def("enqueue", &CudaBridge::enqueue, "stream"_a, "layer"_a, "n_tokens"_a, "counted"_a = false)
        .def("check", &CudaBridge::check)
        .def_prop_ro("flags", &CudaBridge::flags);

    m.def("copy_rows_to_device", &copy_rows_to_device, "dst"_a, "dst_pitch"_a, "src"_a, "src_pitch"_a, "width"_a,
          "height"_a, "stream"_a);
    m.def("register_host_memory", &register_host_memory, "address"_a, "size"_a, "flags"_a);
    m.def("read_in", &read_in, "address"_a, "size"_a, nb::call_guard<nb::gil_scoped_release>());
    m.def("unregister_host_memory", &unregister_host_memory, "address"_a);
    m.def("power_saving", &ThreadPool::power_saving);  // LVGG_POWER_SAVING, as the engine reads it
    m.attr("openmp") = ThreadPool::openmp();  // ggml's threads: torch's OpenMP team, or ggml's pool
    m.def("type_from_name", [](const std::string & n) { return (int) type_from_name(n); }, "name"_a);
    m.def("type_name", [](int t) {
        if (t < 0 || t >= GGML_TYPE_COUNT) fail(ErrorKind::Value, "not a ggml type id: " + std::to_string(t));
        return std::string(ggml_type_name((ggml_type) t));
    }, "type"_a);
    m.def("quantized_row_size", [](int t, int64_t n) { return quantized_row_size((ggml_type) t, n); }, "type"_a,
          "n_per_row"_a);
    m.def("quantize",
          [](int type, nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> src,
             nb::ndarray<uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> dst, int threads,
             std::optional<nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>> imatrix) {
              const int64_t rows = (int64_t) src.shape(0), n = (int64_t) src.shape(1);
              const size_t  row  = quantized_row_size((ggml_type) type, n);
              if ((int64_t) dst.shape(0) != rows || dst.shape(1) != row) {
                  fail(ErrorKind::Value, "dst must be [" + std::to_string(rows) + ", " + std::to_string(row) +
                                             "] uint8, found [" + std::to_string(dst.shape(0)) + ", " +
                                             std::to_string(dst.shape(1)) + "]");
              }
              if (imatrix && (int64_t) imatrix->shape(0) != n) {
                  fail(ErrorKind::Value, "imatrix must hold one float32 per column: " + std::to_string(n) +
                                             " values, found " + std::to_string(imatrix->shape(0)));
              }
              nb::gil_scoped_release release;
              quantize_rows((ggml_type) type, src.data(), dst.data(), rows, n, threads,
                            imatrix ? imatrix->data() : nullptr);
          },
          "type"_a, "src"_a, "dst"_a, "threads"_a = 1, "imatrix"_a = nb::none());
    // What a repacking store puts in lvgg's packed layout on this machine (its kernels are built).
    m.def("packable", [](int t, int64_t rows, int64_t cols) {
        return t >= 0 && t < GGML_TYPE_COUNT && vnni::packable((ggml_type) t, rows, cols);
    }, "type"_a, "rows"_a, "cols"_a);
    // lvgg's packed layout (vnni_kquants.h), whatever this CPU runs: the GPU reads it too.
    m.def("packed_size", [](int t, int64_t rows, int64_t cols) {
        check_packed_layout(t, rows, cols);
        return vnni::packed_size((ggml_type) t, rows, cols);
    }, "type"_a, "rows"_a, "cols"_a);
    m.def("pack",
          [](int t, int64_t rows, int64_t cols,
             nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> src,
             nb::ndarray<uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> dst) {
              check_packed_layout(t, rows, cols);
              const size_t file   = quantized_row_size((ggml_type) t, cols) * rows;
              const size_t packed = vnni::packed_size((ggml_type) t, rows, cols);
              if (src.shape(1) != file || dst.shape(0) != src.shape(0) || dst.shape(1) != packed) {
                  auto shape = [](auto & a) {
                      return "[" + std::to_string(a.shape(0)) + ", " + std::to_string(a.shape(1)) + "]";
                  };
                  fail(ErrorKind::Value, "pack takes src [n, " + std::to_string(file) + "] and dst [n, " +
                                             std::to_string(packed) + "] uint8, found " + shape(src) + " and " +
                                             shape(dst));
              }
              nb::gil_scoped_release release;
              vnni::pack((ggml_type) t, src.data(), file, rows, cols, (int64_t) src.shape(0), dst.data(), packed, 1);
          },
          "type"_a, "rows"_a, "cols"_a, "src"_a, "dst"_a);
    m.def("read_bandwidth",
          [](size_t nbytes, int threads, std::vector<int> cpus, int repeats) {
              nb::gil_scoped_release release;
              return read_bandwidth(nbytes, threads, cpus, repeats);
          },
          "nbytes"_a, "threads"_a, "cpus"_a = std::vector<int>(), "repeats"_a = 3);
    m.def("process_cpus", &process_cpus);
    m.def("physical_core_cpus", []() { return one_cpu_per_core(process_cpus()); });
    m.def("cpu_features", []() {
        nb::dict d;
        d["avx2"]        = (bool) ggml_cpu_has_avx2();
        d["fma"]         = (bool) ggml_cpu_has_fma();
        d["f16c"]        = (bool) ggml_cpu_has_f16c();
        d["avx512"]      = (bool) ggml_cpu_has_avx512();
        d["avx512_bf16"] = (bool) ggml_cpu_has_avx512_bf16();
        d["avx512_vnni"] = (bool) ggml_cpu_has_avx512_vnni();
        d["avx512_vbmi"] = (bool) ggml_cpu_has_avx512_vbmi();
        d["amx_int8"]    = (bool) ggml_cpu_has_amx_int8();
        d["llamafile"]   = (bool) ggml_cpu_has_llamafile();
        d["lvgg_kernels"]      = vnni::kernels_in_use();  // lvgg's own kernels (vnni_kquants.h): the set in use
        d["lvgg_kernel_sets"]  = vnni::kernel_sets();     // ... and every set this build has
        nb::list types;  // the types the set in use runs (others run on ggml's kernels)
        for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
            if (vnni::packable((ggml_type) t, vnni::kRows, 256)) {
                std::string name = ggml_type_name((ggml_type) t);
                std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::toupper(c); });
                types.append(name);  // as gguf-py names them
            }
        }
        d["lvgg_kernel_types"] = types;
        return d;
    });
    // Runs another of lvgg's kernel sets from now on (tests and benchmarks compare them).
    m.def("use_kernels", [](const std::string & name) {
        if (!vnni::use_kernels(name)) {
            std::string sets;
            for (const std::string & s : vnni::kernel_sets()) {
                sets += (sets.empty() ? "" : ", ") + s;
            }
            fail(ErrorKind::Value, "no kernel set '" + name + "' in this build; it has: " + (sets.empty() ? "none" : sets));
        }
    }, "name"_a);
}
