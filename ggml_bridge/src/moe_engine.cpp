#include "moe_engine.h"

#include "errors.h"
#include "vnni_kquants.h"

#include <ggml-alloc.h>
#include <ggml-cpu.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace lvgg {

namespace {

constexpr int64_t kCombineCols = 256;  // columns per work unit of the weighted sum

std::string type_str(ggml_type t) { return ggml_type_name(t); }

// dst = src[0] + the row of src[2] (a view of a layer's bias, [rows, experts]) of each row's expert
// (src[1]: one id per row of src[0], -1 where the row has none: copied as it is). Not ggml's ADD_ID:
// it reads a bias row for every id, and lvgg's packed kernels leave the slots without an expert -1.
void add_expert_bias(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * a    = dst->src[0];
    const int32_t *     ids  = (const int32_t *) dst->src[1]->data;
    const ggml_tensor * bias = dst->src[2];
    const int64_t       n    = a->ne[0], rows = ggml_nrows(a);
    for (int64_t r = rows * ith / nth; r < rows * (ith + 1) / nth; ++r) {
        const float * in  = (const float *) ((const char *) a->data + r * a->nb[1]);
        float *       out = (float *) ((char *) dst->data + r * dst->nb[1]);
        const float * b   = ids[r] >= 0 ? (const float *) ((const char *) bias->data + ids[r] * bias->nb[1]) : nullptr;
        for (int64_t i = 0; i < n; ++i) {
            out[i] = b ? in[i] + b[i] : in[i];
        }
    }
}

// Gated activations ggml has no exact f32 op for: Step-3.5's SwiGLU (Activation::SwiGLU_Step) and
// GELU's tanh form (Activation::GELU; ggml's GEGLU looks GELU up in an f16 table, rounding its input
// to f16: a tiny gemma-4's greedy tokens left vLLM's on the AVX-512 EPYC).
constexpr float kStepLimit = 7.0f;  // vLLM's model accepts this limit only

float swiglu_step_unit(float gate, float up) {
    const float silu = gate / (1.0f + std::exp(-gate));
    return std::min(silu, kStepLimit) * std::clamp(up, -kStepLimit, kStepLimit);
}

float geglu_tanh_unit(float gate, float up) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    return 0.5f * gate * (1.0f + std::tanh(kSqrt2OverPi * (gate + 0.044715f * gate * gate * gate))) * up;
}

// dst = Unit(gate, up) of src[0] (gate rows) and src[1] (up rows), or of src[0] alone (gate_up rows:
// each row's gate half first), all f32 rows of dst->ne[0] values.
template <float (*Unit)(float, float)> void gated_rows(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * g = dst->src[0];
    const ggml_tensor * u = dst->src[1];
    const int64_t       n = dst->ne[0], rows = ggml_nrows(dst);
    for (int64_t r = rows * ith / nth; r < rows * (ith + 1) / nth; ++r) {
        const float * gate = (const float *) ((const char *) g->data + r * g->nb[1]);
        const float * up   = u ? (const float *) ((const char *) u->data + r * u->nb[1]) : gate + n;
        float *       out  = (float *) ((char *) dst->data + r * dst->nb[1]);
        for (int64_t i = 0; i < n; ++i) {
            out[i] = Unit(gate[i], up[i]);
        }
    }
}

// out[:, t] = sum_k w[k, t] * rows[:, r(t, k)] with r(t, k) = t*K + k (the [D, K, T] output of
// MUL_MAT_ID) or pos[k, t] (rows sorted by expert), over the slots of nonzero weight. Work is
// split in (token, column block) units so a single token still uses every thread. Writes f32,
// f16 or bf16 into caller memory.
void combine(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * down   = dst->src[0];
    const ggml_tensor * w      = dst->src[1];
    const int32_t *     pos    = dst->src[2] ? (const int32_t *) dst->src[2]->data : nullptr;
    const int64_t       D      = down->ne[0];
    const int64_t       K      = w->ne[1];
    const int64_t       T      = dst->ne[1];
    const int64_t       blocks = (D + kCombineCols - 1) / kCombineCols;
    const int64_t       units  = T * blocks;
    const int64_t       u0     = units * ith / nth;
    const int64_t       u1     = units * (ith + 1) / nth;
    const float *       dd     = (const float *) down->data;
    const float *       wd     = (const float *) w->data;
    float               acc[kCombineCols];
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t t  = u / blocks;
        const int64_t c0 = (u % blocks) * kCombineCols;
        const int64_t nc = std::min(kCombineCols, D - c0);
        for (int64_t c = 0; c < nc; ++c) {
            acc[c] = 0.0f;
        }
        for (int64_t k = 0; k < K; ++k) {
            const float wk = wd[t * K + k];
            if (wk == 0.0f) {
                continue;  // a slot without an expert (its row was not computed), or a weight of 0
            }
            const float * row = dd + (pos ? pos[t * K + k] : t * K + k) * D + c0;
            for (int64_t c = 0; c < nc; ++c) {
                acc[c] += wk * row[c];
            }
        }
        const int64_t o = t * D + c0;
        switch (dst->type) {
            case GGML_TYPE_F32:
                std::memcpy((float *) dst->data + o, acc, nc * sizeof(float));
                break;
            case GGML_TYPE_F16:
                ggml_fp32_to_fp16_row(acc, (ggml_fp16_t *) dst->data + o, nc);
                break;
            default:
                ggml_fp32_to_bf16_row(acc, (ggml_bf16_t *) dst->data + o, nc);
                break;
        }
    }
}

// Activation rows of a packed MUL_MAT_ID: every row of `src[0]` (f32/f16/bf16, contiguous) as
// vnni::ActBlocks (in the Order the weights' kernels read), one 256-value block per work unit (a
// row's last may hold fewer).
template <vnni::ActOrder Order> void quantize_activations(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * in    = dst->src[0];
    const int64_t       nb    = vnni::act_blocks(in->ne[0]);
    const int64_t       units = ggml_nrows(in) * nb;
    const size_t        block = 256 * ggml_type_size(in->type);
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; ++u) {
        const int64_t r = u / nb, b = u % nb;
        vnni::quantize_row((const char *) in->data + r * in->nb[1] + b * block, in->type,
                           std::min<int64_t>(256, in->ne[0] - b * 256),
                           (vnni::ActBlock *) ((char *) dst->data + r * dst->nb[1]) + b, Order);
    }
}

// MUL_MAT_ID on packed weights: dst [rows, K, T] f32 like ggml's. Work units are (expert, group
// of 16 rows) of the chunk's experts, split between threads by an estimated cost (reading a
// group's weights counts as kWeightCost tokens); each unit passes over its weights once per
// vnni::kMaxTile tokens routed to the expert.
void packed_mul_mat_id(ggml_tensor * dst, int ith, int nth, void * userdata) {
    constexpr int64_t kWeightCost = 2;
    const auto &      op      = *(const MoeEngine::PackedMatMul *) userdata;
    const auto &      R       = *op.routing;
    const ggml_tensor * xq    = dst->src[0];
    const bool        per_slot = xq->ne[1] != R.n_tokens;  // down: one activation row per (token, slot)
    const int64_t     groups  = op.rows / vnni::kRows;
    const int32_t *   er      = R.expert_rows;
    int64_t           total   = 0;
    for (int64_t e = 0; e < R.n_expert; ++e) {
        const int64_t c = er[e + 1] - er[e];
        total += c ? groups * (kWeightCost + c) : 0;
    }
    const int64_t lo = total * ith / nth, hi = total * (ith + 1) / nth;
    int64_t       base = 0;
    for (int64_t e = 0; e < R.n_expert && base < hi; ++e) {
        const int64_t c = er[e + 1] - er[e];
        if (c == 0) {
            continue;
        }
        const int64_t unit = kWeightCost + c;
        const int64_t g0 = lo > base ? (lo - base + unit - 1) / unit : 0;  // groups starting in [lo, hi)
        const int64_t g1 = std::min(groups, (hi - base + unit - 1) / unit);
        for (int64_t g = g0; g < g1; ++g) {
            const uint8_t * w = op.data + e * op.stride + vnni::group_offset(op.type, op.cols, g);
            for (int64_t r0 = er[e]; r0 < er[e + 1]; r0 += vnni::kMaxTile) {
                const int n = (int) std::min<int64_t>(vnni::kMaxTile, er[e + 1] - r0);
                const vnni::ActBlock * x[vnni::kMaxTile];
                float *                out[vnni::kMaxTile];
                for (int i = 0; i < n; ++i) {
                    const int64_t slot = R.sorted_slots[r0 + i];
                    x[i]   = (const vnni::ActBlock *) ((const char *) xq->data +
                                                     (per_slot ? slot : slot / R.top_k) * xq->nb[1]);
                    out[i] = (float *) dst->data + slot * op.rows + g * vnni::kRows;
                }
                vnni::multiply_group(op.type, w, op.cols, x, n, out);
            }
        }
        base += groups * unit;
    }
}

// Activations for a rows part's down (ExpertLayer::down_lead): every row of `src[0]` (f32,
// contiguous) placed down_lead values into a row of zeros as wide as down's.
void pad_for_down(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto &        L    = *(const ExpertLayer *) userdata;
    const ggml_tensor * in   = dst->src[0];
    const int64_t       rows = ggml_nrows(in), n = in->ne[0];
    for (int64_t r = rows * ith / nth; r < rows * (ith + 1) / nth; ++r) {
        float * to = (float *) ((char *) dst->data + r * dst->nb[1]);
        std::fill(to, to + L.down_lead, 0.0f);
        std::memcpy(to + L.down_lead, (const char *) in->data + r * in->nb[1], n * sizeof(float));
        std::fill(to + L.down_lead + n, to + dst->ne[0], 0.0f);
    }
}

// Element i of topk_ids (int32 or int64, checked by validate()).
int64_t routed_id(const Matrix & ids, int64_t i) {
    return ids.type == GGML_TYPE_I32 ? ((const int32_t *) ids.data)[i] : ((const int64_t *) ids.data)[i];
}

bool is_float_type(ggml_type t) { return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16; }

void to_f32(const void * src, ggml_type type, float * dst, int64_t n) {
    switch (type) {
        case GGML_TYPE_F32:
            std::memcpy(dst, src, n * sizeof(float));
            break;
        case GGML_TYPE_F16:
            ggml_fp16_to_fp32_row((const ggml_fp16_t *) src, dst, n);
            break;
        default:
            ggml_bf16_to_fp32_row((const ggml_bf16_t *) src, dst, n);
            break;
    }
}

}  // namespace

Activation parse_activation(const std::string & name) {
    if (name == "silu" || name == "swiglu") {
        return Activation::SiLU;
    }
    if (name == "gelu" || name == "geglu") {
        return Activation::GELU;
    }
    if (name == "swigluoai" || name == "swiglu_oai") {
        return Activation::SwiGLU_OAI;
    }
    if (name == "swiglustep") {
        return Activation::SwiGLU_Step;
    }
    if (name == "relu2" || name == "relu_squared") {
        return Activation::ReLU2;
    }
    fail(ErrorKind::Value,
         "unknown activation '" + name + "': expected 'silu', 'gelu', 'swigluoai', 'swiglustep' or 'relu2'");
}

const char * activation_name(Activation act) {
    switch (act) {
        case Activation::SiLU:
            return "silu";
        case Activation::GELU:
            return "gelu";
        case Activation::SwiGLU_OAI:
            return "swigluoai";
        case Activation::SwiGLU_Step:
            return "swiglustep";
        default:
            return "relu2";
    }
}

MoeEngine::MoeEngine(std::shared_ptr<ExpertStore> store, const EngineConfig & cfg) :
    store_(std::move(store)),
    cfg_(cfg) {
    if (cfg_.max_tokens < 1 || cfg_.max_top_k < 1 || cfg_.chunk < 1) {
        fail(ErrorKind::Value, "max_tokens, max_top_k and chunk must be >= 1");
    }
    if (store_->layers().empty()) {
        fail(ErrorKind::Value, store_->path() + " holds no routed-expert tensors (blk.N.ffn_{gate,up,down}_exps.weight)");
    }
    cfg_.chunk = std::min(cfg_.chunk, cfg_.max_tokens);
    pool_      = std::make_unique<ThreadPool>(cfg_.n_threads, cfg_.cpus, cfg_.strict_cpu);
    cfg_.n_threads = pool_->n_threads();
    cfg_.cpus      = pool_->cpus();

    int64_t max_experts = 0;
    for (const auto & kv : store_->layers()) {
        max_experts = std::max(max_experts, kv.second.n_expert);
    }
    max_nodes_ = 16 * max_experts + 40;  // per expert: 4 views, 4 ops, a copy and its view, 3 biases' views and adds
    arena_.resize(ggml_tensor_overhead() * (max_nodes_ + 16) + ggml_graph_overhead_custom(max_nodes_, false));
    ctx_ = ggml_init({ arena_.size(), arena_.data(), /*no_alloc=*/true });
    ids_i32_.resize(cfg_.chunk * cfg_.max_top_k);
    weights_f32_.resize(cfg_.chunk * cfg_.max_top_k);
    sorted_tokens_.resize(cfg_.chunk * cfg_.max_top_k);
    sorted_pos_.resize(cfg_.chunk * cfg_.max_top_k);
    expert_rows_.resize(max_experts + 1);
    sorted_slots_.resize(cfg_.chunk * cfg_.max_top_k);
    pair_experts_.resize(cfg_.chunk * cfg_.max_top_k);
    read_experts_.reserve(cfg_.max_top_k + 1);
    packed_ops_.reserve(4);  // at most gate, up, gate_up, down per graph

    if (cfg_.schedule == Schedule::PerExpert) {
        for (const auto & kv : store_->layers()) {
            if (!per_expert_possible(kv.second)) {
                fail(ErrorKind::Value, "schedule 'per_expert' runs plain matmuls on the mapped weights, but the store "
                                       "keeps only repacked copies of layer " + std::to_string(kv.first) +
                                       "; open it with repack=False or keep_mapped=True");
            }
        }
    }

    // Size scratch and work buffers for the largest graph of every layer shape.
    size_t scratch = 0, work = 0;
    for (const auto & kv : store_->layers()) {
        const ExpertLayer & L = kv.second;
        if (L.gated() == (cfg_.activation == Activation::ReLU2)) {
            continue;  // forward() refuses this layer/activation pair; nothing to size
        }
        const int64_t n = cfg_.chunk, K = std::min(cfg_.max_top_k, L.routed_experts);
        auto measure = [&](const Graph & g) {
            scratch         = std::max(scratch, intermediate_bytes(g));
            ggml_cplan plan = ggml_graph_plan(g.graph, cfg_.n_threads, pool_->get());
            work            = std::max(work, plan.work_size);
        };
        for (Layout layout : { Layout::Mapped, Layout::Repacked }) {
            ggml_reset(ctx_);
            measure(build_mul_mat_id(L, n, K, GGML_TYPE_BF16, GGML_TYPE_F32, layout));
            if (L.holds_some_experts()) {  // at most every slot routed to the part
                ggml_reset(ctx_);
                measure(build_mul_mat_id(L, n, K, GGML_TYPE_BF16, GGML_TYPE_F32, layout, n * K));
            }
        }
        if (cfg_.schedule != Schedule::MulMatId && per_expert_possible(L)) {
            // Largest work buffer: K experts take every token; most tensors: rows spread evenly.
            for (bool spread : { false, true }) {
                for (int64_t i = 0; i < n * K; ++i) {
                    ids_i32_[i] = (int32_t) (i % (spread ? L.n_expert : std::min(K, L.n_expert)));
                }
                group_by_expert(n, K, L.n_expert);
                ggml_reset(ctx_);
                measure(build_per_expert(L, n, K, GGML_TYPE_BF16, GGML_TYPE_F32));
            }
        }
    }
    scratch_ = ggml_backend_buft_alloc_buffer(ggml_backend_cpu_buffer_type(), std::max<size_t>(scratch, 64));
    if (!scratch_) {
        fail(ErrorKind::Runtime, "out of memory allocating " + std::to_string(scratch >> 20) +
                                     " MiB of MoE scratch; lower chunk or max_top_k");
    }
    work_.resize(work + 64);
}

MoeEngine::~MoeEngine() {
    if (scratch_) {
        ggml_backend_buffer_free(scratch_);
    }
    if (ctx_) {
        ggml_free(ctx_);
    }
}

void MoeEngine::set_activation(int layer, Activation act) {
    const ExpertLayer & L = store_->layer(layer);  // throws for a layer the store does not hold
    // The buffers were sized for the layer's graphs under cfg_.activation: every gated activation's
    // output is one row of n_ff per (token, slot), so a gated layer takes any of them.
    if (L.gated() == (act == Activation::ReLU2) || L.gated() == (cfg_.activation == Activation::ReLU2)) {
        fail(ErrorKind::Value, "layer " + std::to_string(layer) + ": activation '" + activation_name(act) +
                                   "' for " + (L.gated() ? "gated" : "up/down-only") + " experts of an engine made for '" +
                                   activation_name(cfg_.activation) + "'; a layer's activation may only change " +
                                   "between gated ones (silu, gelu, swigluoai, swiglustep)");
    }
    layer_activation_[layer] = act;
}

Activation MoeEngine::activation(int layer) const {
    const auto it = layer_activation_.find(layer);
    return it == layer_activation_.end() ? cfg_.activation : it->second;
}

size_t MoeEngine::scratch_bytes() const { return ggml_backend_buffer_get_size(scratch_) + work_.size(); }

Schedule parse_schedule(const std::string & name) {
    if (name == "auto") {
        return Schedule::Auto;
    }
    if (name == "mul_mat_id") {
        return Schedule::MulMatId;
    }
    if (name == "per_expert") {
        return Schedule::PerExpert;
    }
    fail(ErrorKind::Value, "unknown schedule '" + name + "': expected 'auto', 'mul_mat_id' or 'per_expert'");
}

const char * schedule_name(Schedule schedule) {
    switch (schedule) {
        case Schedule::Auto:
            return "auto";
        case Schedule::MulMatId:
            return "mul_mat_id";
        default:
            return "per_expert";
    }
}

int64_t default_per_expert_min_tokens(ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q8_0:
            return 256;  // llamafile sgemm: 15-25% faster than MUL_MAT_ID from 256 tokens
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
            return 512;  // ties at 512, ~10% faster at 2048
        default:
            return INT64_MAX;  // K-quants: the per-expert schedule never won
    }
}

bool MoeEngine::use_per_expert(const ExpertLayer & L, int64_t n_tokens) const {
    if (cfg_.schedule == Schedule::MulMatId || !per_expert_possible(L)) {
        return false;
    }
    if (cfg_.schedule == Schedule::Auto && store_->packed(store_->repacked(L.down))) {
        return false;  // lvgg's kernels on the packed layout beat the per-expert schedule at every size
    }
    return cfg_.schedule == Schedule::PerExpert || n_tokens >= default_per_expert_min_tokens(L.down->type);
}

int64_t default_repack_max_tokens(ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q2_K:
        case GGML_TYPE_Q3_K:
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K:
        case GGML_TYPE_Q6_K:
            return 96;
        default:
            return INT64_MAX;
    }
}

ggml_tensor * MoeEngine::weights_for(ggml_tensor * t, int64_t n_tokens, Layout layout) const {
    ggml_tensor * twin = t ? store_->repacked(t) : nullptr;
    // lvgg's packed layout beat the mapped one at every size measured (1 to 512 tokens).
    if (!twin || !store_->keeps_mapped() || store_->packed(twin)) {
        return twin ? twin : t;
    }
    if (layout == Layout::BySize) {
        const int64_t limit = cfg_.repack_max_tokens >= 0 ? cfg_.repack_max_tokens : default_repack_max_tokens(t->type);
        layout              = n_tokens <= limit ? Layout::Repacked : Layout::Mapped;
    }
    return layout == Layout::Repacked ? twin : t;
}

// With `pairs` >= 0 (compact), only the chunk's routed (token, slot) pairs are computed, each a
// row of its own with one expert (rows sorted by expert: group_by_expert): ggml's MUL_MAT_ID
// takes a real expert in every slot, and a part holding some of the experts (expert parallel)
// would otherwise compute a stand-in for each slot routed elsewhere, most of a token's.
MoeEngine::Graph MoeEngine::build_mul_mat_id(const ExpertLayer & L, int64_t n, int64_t K, ggml_type x_type,
                                             ggml_type out_type, Layout layout, int64_t pairs) {
    ggml_context * ctx     = ctx_;
    const bool     compact = pairs >= 0;
    ggml_tensor *  gate    = weights_for(L.gate, n, layout);
    ggml_tensor *  up_w    = weights_for(L.up, n, layout);
    ggml_tensor *  gate_up = gate && gate == up_w ? gate : weights_for(L.gate_up, n, layout);  // repacked as one
    ggml_tensor *  down_w  = weights_for(L.down, n, layout);
    Graph g = new_graph_inputs(compact ? ggml_new_tensor_2d(ctx, x_type, L.n_embd, n)
                                       : ggml_new_tensor_3d(ctx, x_type, L.n_embd, 1, n), n, K);
    ggml_tensor * x   = g.x;
    ggml_tensor * ids = g.ids;
    if (compact) {
        g.rows         = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, pairs);
        g.pos          = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, n);
        g.pair_experts = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, pairs);
        for (ggml_tensor * t : { g.rows, g.pos, g.pair_experts }) {
            ggml_set_input(t);
        }
        x   = ggml_reshape_3d(ctx, ggml_get_rows(ctx, g.x, g.rows), L.n_embd, 1, pairs);  // [D, 1, pairs] f32
        ids = g.pair_experts;
    }

    ggml_tensor * h;
    if (gate_up) {
        h = activate(activation(L.index), nullptr, nullptr, with_bias(mul_mat_id(gate_up, x, ids), L.in_bias, 0, ids));
    } else {
        ggml_tensor * up = with_bias(mul_mat_id(up_w, x, ids), L.in_bias, gate ? L.n_ff : 0, ids);
        h = activate(activation(L.index), gate ? with_bias(mul_mat_id(gate, x, ids), L.in_bias, 0, ids) : nullptr, up,
                     nullptr);
    }
    ggml_tensor * down = with_bias(mul_mat_id(down_w, padded_for_down(L, h), ids), L.out_bias, 0, ids);
    if (compact) {
        ggml_tensor * args[3] = { ggml_reshape_2d(ctx, down, L.n_embd, pairs), g.weights, g.pos };
        finish_graph(g, ggml_custom_4d(ctx, out_type, L.n_embd, n, 1, 1, args, 3, combine, GGML_N_TASKS_MAX, nullptr));
    } else {
        ggml_tensor * args[2] = { down, g.weights };
        finish_graph(g, ggml_custom_4d(ctx, out_type, L.n_embd, n, 1, 1, args, 2, combine, GGML_N_TASKS_MAX, nullptr));
    }
    return g;
}

// The activation of gate and up outputs (ReLU2: of up alone), or of a fused gate_up's (gate rows first).
ggml_tensor * MoeEngine::activate(Activation act, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * gate_up) {
    switch (act) {
        case Activation::SiLU:
            return gate_up ? ggml_swiglu(ctx_, gate_up) : ggml_swiglu_split(ctx_, gate, up);
        case Activation::SwiGLU_OAI:  // gpt-oss's constants, as vLLM and llama.cpp fix them
            return ggml_swiglu_oai(ctx_, gate_up ? gate_up : gate, gate_up ? nullptr : up, 1.702f, 7.0f);
        case Activation::GELU:
        case Activation::SwiGLU_Step: {  // one output of the rows' size, as ggml's GLU ops give
            ggml_tensor * a       = gate_up ? gate_up : gate;
            ggml_tensor * args[2] = { a, gate_up ? nullptr : up };
            return ggml_custom_4d(ctx_, GGML_TYPE_F32, gate_up ? a->ne[0] / 2 : a->ne[0], a->ne[1], a->ne[2], 1, args,
                                  gate_up ? 1 : 2,
                                  act == Activation::GELU ? gated_rows<geglu_tanh_unit> : gated_rows<swiglu_step_unit>,
                                  GGML_N_TASKS_MAX, nullptr);
        }
        default:
            return ggml_sqr(ctx_, ggml_relu(ctx_, up));
    }
}

// a [rows, slots, tokens] (or [rows, 1, pairs]) plus, per (token, slot), the bias of its expert
// ids[slot, token]: rows [first_row, first_row + rows) of that expert's row of `bias` [*, experts].
// Slots without an expert (-1) are left as they are (their weight is 0).
ggml_tensor * MoeEngine::with_bias(ggml_tensor * a, ggml_tensor * bias, int64_t first_row, ggml_tensor * ids) {
    if (!bias) {
        return a;
    }
    ggml_tensor * args[3] = { a, ids, ggml_view_2d(ctx_, bias, a->ne[0], bias->ne[1], bias->nb[1],
                                                   first_row * sizeof(float)) };
    return ggml_custom_4d(ctx_, GGML_TYPE_F32, a->ne[0], a->ne[1], a->ne[2], 1, args, 3, add_expert_bias,
                          GGML_N_TASKS_MAX, nullptr);
}

// The activations `h` ([F, ...] f32) as L's down takes them: zero-padded to its whole blocks in a
// rows part (ExpertLayer::down_lead), else as they are.
ggml_tensor * MoeEngine::padded_for_down(const ExpertLayer & L, ggml_tensor * h) {
    if (L.down_cols() == L.n_ff) {
        return h;
    }
    return ggml_custom_4d(ctx_, GGML_TYPE_F32, L.down_cols(), h->ne[1], h->ne[2], h->ne[3], &h, 1, pad_for_down,
                          GGML_N_TASKS_MAX, (void *) &L);
}

// ggml's MUL_MAT_ID, or lvgg's on a packed twin (activations quantized once per input).
ggml_tensor * MoeEngine::mul_mat_id(ggml_tensor * w, ggml_tensor * in, ggml_tensor * ids) {
    if (!store_->packed(w)) {
        if (in->type != GGML_TYPE_F32 && as_f32_from_ != in) {
            as_f32_      = ggml_cast(ctx_, in, GGML_TYPE_F32);
            as_f32_from_ = in;
        }
        return ggml_mul_mat_id(ctx_, w, in->type == GGML_TYPE_F32 ? in : as_f32_, ids);
    }
    const vnni::ActOrder order = vnni::act_order(w->type);
    const int            mode  = (int) order;
    if (quantized_from_[mode] != in) {
        static constexpr ggml_custom_op_t quantize[vnni::kActOrders] = {
            quantize_activations<vnni::ActOrder::kPer256>, quantize_activations<vnni::ActOrder::kPer32>,
            quantize_activations<vnni::ActOrder::kGrid16>, quantize_activations<vnni::ActOrder::kGrid32>};
        const int64_t row_bytes = vnni::act_blocks(in->ne[0]) * sizeof(vnni::ActBlock);
        quantized_[mode]      = ggml_custom_4d(ctx_, GGML_TYPE_I8, row_bytes, ggml_nrows(in), 1, 1, &in, 1,
                                               quantize[mode], GGML_N_TASKS_MAX, nullptr);
        quantized_from_[mode] = in;
    }
    packed_ops_.push_back({ &routing_, w->type, (const uint8_t *) w->data,
                            vnni::packed_size(w->type, w->ne[1], w->ne[0]), w->ne[1], w->ne[0] });
    return ggml_custom_4d(ctx_, GGML_TYPE_F32, w->ne[1], ids->ne[0], ids->ne[1], 1, &quantized_[mode], 1,
                          packed_mul_mat_id, GGML_N_TASKS_MAX, &packed_ops_.back());
}

MoeEngine::Graph MoeEngine::new_graph_inputs(ggml_tensor * x, int64_t n, int64_t K) {
    packed_ops_.clear();
    std::fill(std::begin(quantized_from_), std::end(quantized_from_), nullptr);
    as_f32_from_ = nullptr;
    Graph g;
    g.x       = x;
    g.ids     = ggml_new_tensor_2d(ctx_, GGML_TYPE_I32, K, n);
    g.weights = ggml_new_tensor_3d(ctx_, GGML_TYPE_F32, 1, K, n);
    g.graph   = ggml_new_graph_custom(ctx_, max_nodes_, false);
    for (ggml_tensor * t : { g.x, g.ids, g.weights }) {
        ggml_set_input(t);
    }
    return g;
}

void MoeEngine::finish_graph(Graph & g, ggml_tensor * out) {
    g.out = out;
    ggml_set_output(g.out);
    ggml_build_forward_expand(g.graph, g.out);
}

bool MoeEngine::per_expert_possible(const ExpertLayer & L) const {
    for (ggml_tensor * t : L.tensors()) {
        if (store_->repacked(t) && !store_->keeps_mapped()) {
            return false;  // only the repacked copy is resident; plain MUL_MAT needs the mapped one
        }
    }
    return true;
}

// Counting sort of the chunk's (token, slot) pairs by expert: sorted_tokens_ lists the token of
// each sorted row, sorted_pos_[t*K + k] is the sorted row of slot k of token t, and expert e
// owns rows [expert_rows_[e], expert_rows_[e+1]). Slots without an expert (-1) are left out.
void MoeEngine::group_by_expert(int64_t n, int64_t K, int64_t n_expert) {
    std::fill(expert_rows_.begin(), expert_rows_.begin() + n_expert + 1, 0);
    for (int64_t i = 0; i < n * K; ++i) {
        if (ids_i32_[i] >= 0) {
            ++expert_rows_[ids_i32_[i] + 1];
        }
    }
    for (int64_t e = 0; e < n_expert; ++e) {
        expert_rows_[e + 1] += expert_rows_[e];
    }
    // Rows past the grouped ones (slots without an expert) point at token 0, which get_rows reads.
    std::fill(sorted_tokens_.begin() + expert_rows_[n_expert], sorted_tokens_.begin() + n * K, 0);
    for (int64_t i = 0; i < n * K; ++i) {
        if (ids_i32_[i] < 0) {
            sorted_pos_[i] = -1;  // weight 0: combine never reads it
            continue;
        }
        const int32_t row    = expert_rows_[ids_i32_[i]]++;
        sorted_tokens_[row]  = (int32_t) (i / K);
        sorted_slots_[row]   = (int32_t) i;
        sorted_pos_[i]       = row;
    }
    for (int64_t e = n_expert; e > 0; --e) {  // the fill advanced each start to the next one's
        expert_rows_[e] = expert_rows_[e - 1];
    }
    expert_rows_[0] = 0;
}

// One plain MUL_MAT per active expert and projection on that expert's rows (gathered by
// get_rows), so ggml can use llamafile's sgemm where the type has one.
MoeEngine::Graph MoeEngine::build_per_expert(const ExpertLayer & L, int64_t n, int64_t K, ggml_type x_type,
                                             ggml_type out_type) {
    ggml_context * ctx = ctx_;
    const int64_t  D   = L.n_embd;
    Graph          g   = new_graph_inputs(ggml_new_tensor_2d(ctx, x_type, D, n), n, K);
    g.rows             = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n * K);
    g.pos              = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, n);
    ggml_set_input(g.rows);
    ggml_set_input(g.pos);
    ggml_tensor * xs = ggml_get_rows(ctx, g.x, g.rows);  // [D, n*K] f32, sorted by expert
    ggml_tensor * ys = g.sorted_out = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D, n * K);
    auto expert = [&](ggml_tensor * w, int64_t e) {
        return w ? ggml_view_2d(ctx, w, w->ne[0], w->ne[1], w->nb[1], e * w->nb[2]) : nullptr;
    };
    for (int64_t e = 0; e < L.n_expert; ++e) {
        const int64_t r0 = expert_rows_[e], c = expert_rows_[e + 1] - r0;
        if (c == 0) {
            continue;
        }
        // w's product with the expert's rows, plus rows [first, ...) of its bias (where there is one)
        auto product = [&](ggml_tensor * w, ggml_tensor * in, ggml_tensor * bias, int64_t first) {
            ggml_tensor * y = ggml_mul_mat(ctx, expert(w, e), in);
            return bias ? ggml_add(ctx, y, ggml_view_1d(ctx, bias, y->ne[0], e * bias->nb[1] + first * sizeof(float)))
                        : y;
        };
        ggml_tensor * xe = ggml_view_2d(ctx, xs, D, c, xs->nb[1], r0 * xs->nb[1]);
        ggml_tensor * h;
        if (L.gate_up) {
            h = activate(activation(L.index), nullptr, nullptr, product(L.gate_up, xe, L.in_bias, 0));
        } else {
            ggml_tensor * up = product(L.up, xe, L.in_bias, L.gate ? L.n_ff : 0);
            h = activate(activation(L.index), L.gate ? product(L.gate, xe, L.in_bias, 0) : nullptr, up, nullptr);
        }
        ggml_tensor * de = product(L.down, padded_for_down(L, h), L.out_bias, 0);
        ggml_build_forward_expand(g.graph, ggml_cpy(ctx, de, ggml_view_2d(ctx, ys, D, c, ys->nb[1], r0 * ys->nb[1])));
    }
    ggml_tensor * args[3] = { ys, g.weights, g.pos };
    finish_graph(g, ggml_custom_4d(ctx, out_type, D, n, 1, 1, args, 3, combine, GGML_N_TASKS_MAX, nullptr));
    return g;
}

// Tensors that live in the scratch buffer: neither caller memory (inputs, output), nor
// weights, nor views of something else.
static bool needs_scratch(const ggml_tensor * t) {
    return !t->data && !t->view_src && !(t->flags & (GGML_TENSOR_FLAG_INPUT | GGML_TENSOR_FLAG_OUTPUT));
}

// The scratch leaf (if any) first, then the nodes in execution order.
template <typename F> static void for_each_tensor(ggml_tensor * scratch_leaf, ggml_cgraph * graph, F f) {
    if (scratch_leaf) {
        f(scratch_leaf);
    }
    for (int i = 0; i < ggml_graph_n_nodes(graph); ++i) {
        f(ggml_graph_node(graph, i));
    }
}

size_t MoeEngine::intermediate_bytes(const Graph & g) const {
    ggml_backend_buffer_type_t buft  = ggml_backend_cpu_buffer_type();
    const size_t               align = ggml_backend_buft_get_alignment(buft);
    size_t                     total = 0;
    for_each_tensor(g.sorted_out, g.graph, [&](ggml_tensor * t) {
        if (needs_scratch(t)) {
            total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
        }
    });
    return total;
}

void MoeEngine::allocate_intermediates(const Graph & g) {
    ggml_tallocr alloc = ggml_tallocr_new(scratch_);
    for_each_tensor(g.sorted_out, g.graph, [&](ggml_tensor * t) {
        ggml_status st = GGML_STATUS_SUCCESS;
        if (t->view_src && !t->data) {
            st = ggml_backend_view_init(t);
        } else if (needs_scratch(t)) {
            st = ggml_tallocr_alloc(&alloc, t);
        }
        if (st != GGML_STATUS_SUCCESS) {
            fail(ErrorKind::Runtime, "internal error: MoE scratch too small for " + std::string(ggml_op_desc(t)));
        }
    });
}

void MoeEngine::compute(const Graph & g) {
    ggml_cplan plan = ggml_graph_plan(g.graph, cfg_.n_threads, pool_->get());
    if (plan.work_size > work_.size()) {
        work_.resize(plan.work_size);  // not expected: sized at creation for the largest graph
    }
    plan.work_data = work_.data();
    const ggml_status st = ggml_graph_compute(g.graph, &plan);
    if (st != GGML_STATUS_SUCCESS) {
        fail(ErrorKind::Runtime, std::string("ggml graph compute failed: ") + ggml_status_to_string(st));
    }
}

void MoeEngine::validate(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                         const Matrix & out) const {
    const ExpertLayer & L = store_->layer(layer);
    const std::string   where = "layer " + std::to_string(layer) + ": ";
    if (!is_float_type(x.type)) {
        fail(ErrorKind::Type, where + "x must be float32, float16 or bfloat16, found " + type_str(x.type));
    }
    if (!is_float_type(out.type)) {
        fail(ErrorKind::Type, where + "out must be float32, float16 or bfloat16, found " + type_str(out.type));
    }
    if (!is_float_type(weights.type)) {
        fail(ErrorKind::Type, where + "topk_weights must be float32, float16 or bfloat16, found " +
                                  type_str(weights.type));
    }
    if (ids.type != GGML_TYPE_I32 && ids.type != GGML_TYPE_I64) {
        fail(ErrorKind::Type, where + "topk_ids must be int32 or int64, found " + type_str(ids.type));
    }
    const int64_t T = x.rows, K = ids.cols;
    if (x.cols != L.n_embd) {
        fail(ErrorKind::Value, where + "x has hidden size " + std::to_string(x.cols) + " but the experts expect " +
                                   std::to_string(L.n_embd) + " (x must be [tokens, " + std::to_string(L.n_embd) + "])");
    }
    if (T > cfg_.max_tokens) {
        fail(ErrorKind::Value, where + "x has " + std::to_string(T) + " tokens, more than max_tokens=" +
                                   std::to_string(cfg_.max_tokens) + " this engine was created for");
    }
    if (ids.rows != T || weights.rows != T || out.rows != T) {
        fail(ErrorKind::Value, where + "x, topk_ids, topk_weights and out must have the same number of rows; found " +
                                   std::to_string(T) + ", " + std::to_string(ids.rows) + ", " +
                                   std::to_string(weights.rows) + ", " + std::to_string(out.rows));
    }
    // (A part of whole experts may hold fewer than K: it leaves out the slots routed elsewhere
    // and never needs stand-ins, see run().)
    if (K < 1 || K > cfg_.max_top_k || K > L.routed_experts) {
        fail(ErrorKind::Value, where + "topk_ids has " + std::to_string(K) + " experts per token; expected 1.." +
                                   std::to_string(std::min(cfg_.max_top_k, L.routed_experts)) +
                                   " (max_top_k=" + std::to_string(cfg_.max_top_k) + ", " +
                                   std::to_string(L.routed_experts) + " experts in the layer)");
    }
    if (weights.cols != K) {
        fail(ErrorKind::Value, where + "topk_weights must be [tokens, " + std::to_string(K) + "] like topk_ids, found [" +
                                   std::to_string(weights.rows) + ", " + std::to_string(weights.cols) + "]");
    }
    if (out.cols != L.n_embd) {
        fail(ErrorKind::Value, where + "out must be [tokens, " + std::to_string(L.n_embd) + "], found [" +
                                   std::to_string(out.rows) + ", " + std::to_string(out.cols) + "]");
    }
    const Activation act = activation(layer);
    if (L.gated() && act == Activation::ReLU2) {
        fail(ErrorKind::Value, where + "the experts are gated (gate and up tensors); activation 'relu2' is for "
                                       "up/down-only experts: use 'silu' or 'gelu'");
    }
    if (!L.gated() && act != Activation::ReLU2) {
        fail(ErrorKind::Value, where + "the experts have no gate tensor (up/down only); they need activation "
                                       "'relu2', not '" + std::string(activation_name(act)) + "'");
    }
}

void MoeEngine::check_ids(int layer, const Matrix & ids) const {
    const int64_t n_expert = store_->layer(layer).routed_experts, T = ids.rows, K = ids.cols;
    for (int64_t i = 0; i < T * K; ++i) {
        const int64_t e = routed_id(ids, i);
        if (e < -1 || e >= n_expert) {
            fail(ErrorKind::Index, "layer " + std::to_string(layer) + ": topk_ids[" + std::to_string(i / K) + ", " +
                                       std::to_string(i % K) + "] = " + std::to_string(e) +
                                       " is not an expert index: expected 0.." + std::to_string(n_expert - 1) +
                                       ", or -1 for no expert");
        }
    }
}

// Copies one chunk's routing into the engine's int32/f32 buffers, the router's expert indices
// made the store's (an expert-parallel part's: the experts it does not hold become -1). A row
// that names an expert twice gets the weights summed on the first slot. The repeats and the slots without an expert
// (-1) then get weight 0 and, where `skip` (lvgg's packed kernels and the per-expert schedule
// leave -1 out), stay -1; otherwise (ggml's MUL_MAT_ID takes a real expert in every slot and its
// repacked form assumes distinct experts per token) a stand-in absent from the row, preferably
// one the chunk reads anyway.
void MoeEngine::stage_routing(const ExpertLayer & L, const Matrix & ids, const Matrix & weights, int64_t t0,
                              int64_t n, bool skip) {
    const int64_t K = ids.cols, n_expert = L.n_expert;
    for (int64_t i = 0; i < n * K; ++i) {
        const int64_t e = routed_id(ids, t0 * K + i) - L.first_expert;
        ids_i32_[i]     = e >= 0 && e < n_expert ? (int32_t) e : -1;
    }
    to_f32((const char *) weights.data + t0 * K * ggml_type_size(weights.type), weights.type, weights_f32_.data(), n * K);
    // Stand-ins come first from the chunk's first K + 1 distinct experts (read anyway): one of
    // them is absent from any row of K.
    read_experts_.clear();
    for (int64_t i = 0; !skip && i < n * K && (int64_t) read_experts_.size() <= K; ++i) {
        const int32_t e = ids_i32_[i];
        if (e >= 0 && std::find(read_experts_.begin(), read_experts_.end(), e) == read_experts_.end()) {
            read_experts_.push_back(e);
        }
    }
    for (int64_t t = 0; t < n; ++t) {
        int32_t * row = ids_i32_.data() + t * K;
        float *   w   = weights_f32_.data() + t * K;
        for (int64_t k = 0; k < K; ++k) {
            if (row[k] >= 0) {
                const int64_t first = std::find(row, row + k, row[k]) - row;
                if (first == k) {
                    continue;
                }
                w[first] += w[k];
            }
            w[k]   = 0.0f;
            row[k] = skip ? -1 : stand_in(row, K, n_expert);
        }
    }
}

int32_t MoeEngine::stand_in(const int32_t * row, int64_t K, int64_t n_expert) const {
    auto absent = [&](int32_t e) { return std::find(row, row + K, e) == row + K; };
    for (int32_t e : read_experts_) {
        if (absent(e)) {
            return e;
        }
    }
    int32_t e = 0;
    while (e < n_expert && !absent(e)) {
        ++e;
    }
    return e;  // K <= n_expert, so a free expert exists
}

bool MoeEngine::skips_empty_slots(const ExpertLayer & L, int64_t n_tokens, bool per_expert) const {
    if (per_expert) {
        return true;
    }
    for (ggml_tensor * t : L.tensors()) {
        if (!store_->packed(weights_for(t, n_tokens, Layout::BySize))) {
            return false;
        }
    }
    return true;
}

void CallStats::record(std::chrono::steady_clock::duration elapsed, int64_t tokens) {
    const double seconds = std::chrono::duration<double>(elapsed).count();
    const size_t bucket  = std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin();
    counts_[bucket].fetch_add(1, std::memory_order_relaxed);
    nanoseconds_.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count(),
                           std::memory_order_relaxed);
    tokens_.fetch_add(tokens, std::memory_order_relaxed);
}

CallStats::Snapshot CallStats::snapshot() const {
    Snapshot s;
    for (const auto & c : counts_) {
        s.counts.push_back(c.load(std::memory_order_relaxed));
    }
    s.seconds = nanoseconds_.load(std::memory_order_relaxed) * 1e-9;
    s.tokens  = tokens_.load(std::memory_order_relaxed);
    return s;
}

void MoeEngine::forward(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights, const Matrix & out) {
    validate(layer, x, ids, weights, out);
    check_ids(layer, ids);
    const auto start = std::chrono::steady_clock::now();
    run(layer, x, ids, weights, out);
    stats.record(std::chrono::steady_clock::now() - start, x.rows);
}

void MoeEngine::run(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights, const Matrix & out) {
    std::lock_guard<std::mutex> lock(mutex_);
    const ExpertLayer & L = store_->layer(layer);
    const int64_t       T = x.rows, K = ids.cols;
    const size_t        x_row   = ggml_row_size(x.type, L.n_embd);
    const size_t        out_row = ggml_row_size(out.type, L.n_embd);

    for (int64_t t0 = 0; t0 < T; t0 += cfg_.chunk) {
        const int64_t n = std::min(cfg_.chunk, T - t0);
        ggml_reset(ctx_);
        const bool per_expert = use_per_expert(L, n);
        const bool skip       = skips_empty_slots(L, n, per_expert);
        const bool compact    = !skip && L.holds_some_experts();
        stage_routing(L, ids, weights, t0, n, skip || compact);
        Graph g;
        if (per_expert) {
            group_by_expert(n, K, L.n_expert);
            g            = build_per_expert(L, n, K, x.type, out.type);
            g.rows->data = sorted_tokens_.data();
            g.pos->data  = sorted_pos_.data();
        } else if (compact) {
            group_by_expert(n, K, L.n_expert);
            const int64_t pairs = expert_rows_[L.n_expert];
            if (pairs == 0) {  // no token of the chunk routed to this part's experts
                std::memset((char *) out.data + t0 * out_row, 0, n * out_row);
                continue;
            }
            for (int64_t e = 0; e < L.n_expert; ++e) {
                std::fill(pair_experts_.begin() + expert_rows_[e], pair_experts_.begin() + expert_rows_[e + 1],
                          (int32_t) e);
            }
            g                    = build_mul_mat_id(L, n, K, x.type, out.type, Layout::BySize, pairs);
            g.rows->data         = sorted_tokens_.data();
            g.pos->data          = sorted_pos_.data();
            g.pair_experts->data = pair_experts_.data();
        } else {
            g = build_mul_mat_id(L, n, K, x.type, out.type, Layout::BySize);
            if (!packed_ops_.empty()) {
                group_by_expert(n, K, L.n_expert);
                routing_ = { n, K, L.n_expert, expert_rows_.data(), sorted_slots_.data() };
            }
        }
        g.x->data       = (char *) x.data + t0 * x_row;
        g.out->data     = (char *) out.data + t0 * out_row;
        g.ids->data     = ids_i32_.data();
        g.weights->data = weights_f32_.data();
        allocate_intermediates(g);
        compute(g);
    }
}

}  // namespace lvgg
