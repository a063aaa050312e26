// MoeEngine: computes the routed experts of one MoE layer on the CPU with ggml.
//
//   out[t] = sum_k w[t,k] * down_e( act(gate_e(x_t)) * up_e(x_t) ),  e = ids[t,k]
//
// with the experts' biases, where the file has them, added to each projection's output.
// The engine owns its thread pool, a scratch buffer for intermediate tensors, the ggml
// work buffer and an arena for graph metadata, all sized at creation for the largest token
// chunk and top-k it accepts; forward() only builds a graph in that arena and computes it.
// Token counts above the chunk size run chunk by chunk.
//
// Two schedules: MUL_MAT_ID (one op per projection for all experts; ggml's repacked and
// tiled kernels) and per-expert (tokens grouped by expert, one plain MUL_MAT per active
// expert and projection, which reaches llamafile's sgemm for Q4_0/Q8_0/F16/BF16).
#pragma once

#include "expert_store.h"
#include "threads.h"
#include "vnni_kquants.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace lvgg {

// SwiGLU_OAI: gpt-oss's, as vLLM's swigluoai and llama.cpp compute it: gate clamped above at 7, up
// to [-7, 7], gate * sigmoid(1.702 gate) * (up + 1).
// SwiGLU_Step: Step-3.5's (vLLM's swiglustep): silu(gate) clamped above at 7, times up clamped to
// [-7, 7].
enum class Activation { SiLU, GELU, SwiGLU_OAI, SwiGLU_Step, ReLU2 };
enum class Schedule { Auto, MulMatId, PerExpert };

Schedule     parse_schedule(const std::string & name);
const char * schedule_name(Schedule schedule);

// Smallest chunk for which the per-expert schedule beats MUL_MAT_ID, by weight type
// (INT64_MAX: never), as measured on the reference Xeon (16 threads, 30B-A3B shapes).
int64_t default_per_expert_min_tokens(ggml_type type);

Activation  parse_activation(const std::string & name);

// Largest chunk for which ggml's repacked kernels beat the mapped layout, by weight type (lvgg's
// packed layout, where a store has it, is used for every chunk).
// Measured on a 16-core AVX-512 Xeon, 30B-A3B shapes: repacked Q4_K wins at 64 tokens and
// loses at 128 (ggml's tiled K-quant path takes over); repacked Q4_0 wins at every size.
int64_t     default_repack_max_tokens(ggml_type type);
const char * activation_name(Activation act);

// A row-major [rows, cols] view of caller memory (already checked to be C-contiguous).
struct Matrix {
    void *    data = nullptr;
    ggml_type type = GGML_TYPE_F32;
    int64_t   rows = 0;
    int64_t   cols = 0;
};

struct EngineConfig {
    int              n_threads  = 0;   // <= 0: one per physical core of `cpus`
    std::vector<int> cpus;             // empty: the process's CPU set
    bool             strict_cpu = false;
    int64_t          max_tokens = 8192;
    int64_t          max_top_k  = 8;
    int64_t          chunk      = 512;  // tokens per ggml graph
    // Chunks of at most this many tokens use the repacked weights when the store keeps both
    // layouts; larger chunks use the mapped ones. < 0: per type, as measured (see
    // default_repack_max_tokens).
    int64_t          repack_max_tokens = -1;
    Schedule         schedule          = Schedule::Auto;
    Activation       activation = Activation::SiLU;
};

// How long the calls of an engine took: counts by duration (the bucket of the first bound a
// call's seconds do not exceed, the last: above every bound), with their seconds and tokens in
// all. Updated by every forward(), read at any time (what lvgg's metrics export); a reader may
// see one call's parts in two readings, never lose one.
class CallStats {
  public:
    static constexpr std::array<double, 16> bounds = { 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                                                       5e-2, 0.1,    0.25,   0.5,  1.0,  2.5,    5.0,  10.0 };

    struct Snapshot {
        std::vector<uint64_t> counts;  // per bucket: bounds.size() + 1 of them
        double                seconds = 0;
        uint64_t              tokens  = 0;
    };

    void     record(std::chrono::steady_clock::duration elapsed, int64_t tokens);
    Snapshot snapshot() const;

  private:
    std::array<std::atomic<uint64_t>, bounds.size() + 1> counts_{};
    std::atomic<uint64_t>                                nanoseconds_{ 0 }, tokens_{ 0 };
};

// What the CUDA bridge and the Python binding call: one engine (MoeEngine) or one per NUMA
// node (SplitEngine).
class Experts {
  public:
    virtual ~Experts() = default;
    CallStats stats;  // of forward()
    // x [T, D] f32/f16/bf16, ids [T, K] i32/i64, weights [T, K] f32/f16/bf16, out [T, D]
    // f32/f16/bf16. Validates everything, then computes; thread-safe (calls serialize).
    virtual void forward(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                         const Matrix & out) = 0;
    // forward's checks of shapes and types, without reading the ids.
    virtual void validate(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                          const Matrix & out) const = 0;
    virtual int64_t max_tokens() const = 0;
    // Where a thread that calls forward() should run (ThreadPool::caller_cpus; empty: anywhere).
    virtual const std::vector<int> & caller_cpus() const = 0;
    // The activation of one layer's experts: EngineConfig's, unless set for the layer (Step-3.5's
    // layers differ). Set before the first forward(); a gated layer takes any gated activation.
    virtual void       set_activation(int layer, Activation act) = 0;
    virtual Activation activation(int layer) const               = 0;
};

class MoeEngine : public Experts {
  public:
    MoeEngine(std::shared_ptr<ExpertStore> store, const EngineConfig & cfg);
    ~MoeEngine();
    MoeEngine(const MoeEngine &)             = delete;
    MoeEngine & operator=(const MoeEngine &) = delete;

    void forward(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                 const Matrix & out) override;
    void validate(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                  const Matrix & out) const override;
    void check_ids(int layer, const Matrix & ids) const;  // forward's check of the ids' values
    // forward without its checks, for a caller that made them (SplitEngine: once for all nodes).
    void run(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights, const Matrix & out);
    int64_t max_tokens() const override { return cfg_.max_tokens; }
    const std::vector<int> & caller_cpus() const override { return pool_->caller_cpus(); }
    void       set_activation(int layer, Activation act) override;
    Activation activation(int layer) const override;

    const EngineConfig &                 config() const { return cfg_; }
    const ThreadPool &                   pool() const { return *pool_; }
    ThreadPool &                         pool() { return *pool_; }
    const std::shared_ptr<ExpertStore> & store() const { return store_; }
    size_t                               scratch_bytes() const;

    // The chunk being computed, its (token, slot) pairs grouped by expert (group_by_expert), as
    // the packed-weights ops read it.
    struct Routing {
        int64_t         n_tokens = 0, top_k = 0, n_expert = 0;
        const int32_t * expert_rows  = nullptr;  // expert e owns sorted rows [expert_rows[e], expert_rows[e+1])
        const int32_t * sorted_slots = nullptr;  // slot t*top_k + k of each sorted row
    };
    // One MUL_MAT_ID on a packed twin (ExpertStore::packed), run by lvgg's kernels.
    struct PackedMatMul {
        const Routing * routing;
        ggml_type       type;
        const uint8_t * data;
        size_t          stride;  // bytes per expert
        int64_t         rows, cols;
    };

  private:
    enum class Layout { BySize, Mapped, Repacked };
    struct Graph {
        ggml_cgraph * graph;
        ggml_tensor * x;
        ggml_tensor * ids;
        ggml_tensor * weights;
        ggml_tensor * out;
        ggml_tensor * rows = nullptr;  // per-expert schedule: token of each expert-sorted row
        ggml_tensor * pos  = nullptr;  // per-expert schedule: sorted row of each (token, slot)
        ggml_tensor * sorted_out = nullptr;  // per-expert schedule: down outputs, expert-sorted
        ggml_tensor * pair_experts = nullptr;  // compact MUL_MAT_ID: expert of each sorted row
    };

    Graph  new_graph_inputs(ggml_tensor * x, int64_t n_tokens, int64_t top_k);
    void   finish_graph(Graph & g, ggml_tensor * out);
    Graph  build_mul_mat_id(const ExpertLayer & L, int64_t n_tokens, int64_t top_k, ggml_type x_type,
                            ggml_type out_type, Layout layout, int64_t pairs = -1);
    Graph  build_per_expert(const ExpertLayer & L, int64_t n_tokens, int64_t top_k, ggml_type x_type,
                            ggml_type out_type);
    bool   per_expert_possible(const ExpertLayer & L) const;
    bool   use_per_expert(const ExpertLayer & L, int64_t n_tokens) const;
    void   group_by_expert(int64_t n_tokens, int64_t top_k, int64_t n_expert);
    ggml_tensor * weights_for(ggml_tensor * t, int64_t n_tokens, Layout layout) const;
    ggml_tensor * mul_mat_id(ggml_tensor * w, ggml_tensor * in, ggml_tensor * ids);
    ggml_tensor * padded_for_down(const ExpertLayer & L, ggml_tensor * h);
    // gate and up's outputs, or a fused gate_up's (the others null); ReLU2: up's alone
    ggml_tensor * activate(Activation act, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * gate_up);
    ggml_tensor * with_bias(ggml_tensor * a, ggml_tensor * bias, int64_t first_row, ggml_tensor * ids);
    size_t intermediate_bytes(const Graph & g) const;
    void   stage_routing(const ExpertLayer & L, const Matrix & ids, const Matrix & weights, int64_t t0, int64_t n,
                         bool skip);
    int32_t stand_in(const int32_t * row, int64_t top_k, int64_t n_expert) const;
    bool   skips_empty_slots(const ExpertLayer & L, int64_t n_tokens, bool per_expert) const;
    void   allocate_intermediates(const Graph & g);
    void   compute(const Graph & g);

    std::shared_ptr<ExpertStore> store_;
    EngineConfig                 cfg_;
    std::map<int, Activation>    layer_activation_;  // set_activation's, by layer
    std::unique_ptr<ThreadPool>  pool_;
    int64_t                      max_nodes_ = 0;
    std::vector<uint8_t>         arena_;    // graph metadata
    ggml_context *               ctx_     = nullptr;
    ggml_backend_buffer_t        scratch_ = nullptr;
    std::vector<uint8_t>         work_;
    std::vector<int32_t>         ids_i32_;      // one chunk's routing, as ggml takes it
    std::vector<float>           weights_f32_;
    std::vector<int32_t>         read_experts_;  // stage_routing's preferred stand-ins
    std::vector<int32_t>         sorted_tokens_;  // per-expert schedule (see group_by_expert)
    std::vector<int32_t>         sorted_pos_;
    std::vector<int32_t>         expert_rows_;
    std::vector<int32_t>         sorted_slots_;
    std::vector<int32_t>         pair_experts_;  // compact MUL_MAT_ID: expert of each sorted row
    Routing                      routing_;
    std::vector<PackedMatMul>    packed_ops_;  // this graph's, in build order (reserved: stable addresses)
    ggml_tensor *                quantized_from_[vnni::kActOrders] = {};  // the last input quantized for packed
    ggml_tensor *                quantized_[vnni::kActOrders]      = {};  // ops, and the result (per vnni::ActOrder)
    ggml_tensor *                as_f32_from_    = nullptr;  // the last input cast to f32 for ggml's ops
    ggml_tensor *                as_f32_         = nullptr;
    std::mutex                   mutex_;
};

}  // namespace lvgg
