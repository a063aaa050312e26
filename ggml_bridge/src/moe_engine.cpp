#include "moe_engine.h"

#include "errors.h"

#include <ggml-alloc.h>
#include <ggml-cpu.h>

#include <algorithm>
#include <cstring>

namespace lvgg {

namespace {

constexpr int kMaxNodes = 32;
constexpr int64_t kCombineCols = 256;  // columns per work unit of the weighted sum

std::string type_str(ggml_type t) { return ggml_type_name(t); }

// out[:, t] = sum_k w[k, t] * down[:, k, t]; work split in (token, column block) units so a
// single token still uses every thread. Writes f32, f16 or bf16 straight into caller memory.
void combine(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * down   = dst->src[0];
    const ggml_tensor * w      = dst->src[1];
    const int64_t       D      = down->ne[0];
    const int64_t       K      = down->ne[1];
    const int64_t       T      = down->ne[2];
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
            const float   wk  = wd[t * K + k];
            const float * row = dd + (t * K + k) * D + c0;
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
    if (name == "relu2" || name == "relu_squared") {
        return Activation::ReLU2;
    }
    fail(ErrorKind::Value, "unknown activation '" + name + "': expected 'silu', 'gelu' or 'relu2'");
}

const char * activation_name(Activation act) {
    switch (act) {
        case Activation::SiLU:
            return "silu";
        case Activation::GELU:
            return "gelu";
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
    pool_      = std::make_unique<ThreadPool>(cfg_.n_threads, cfg_.cpus, cfg_.poll, cfg_.strict_cpu);
    cfg_.n_threads = pool_->n_threads();
    cfg_.cpus      = pool_->cpus();

    arena_.resize(ggml_tensor_overhead() * kMaxNodes + ggml_graph_overhead_custom(kMaxNodes, false));
    ctx_ = ggml_init({ arena_.size(), arena_.data(), /*no_alloc=*/true });
    ids_i32_.resize(cfg_.chunk * cfg_.max_top_k);
    weights_f32_.resize(cfg_.chunk * cfg_.max_top_k);

    // Size scratch and work buffers for the largest graph of every layer shape.
    size_t scratch = 0, work = 0;
    for (const auto & kv : store_->layers()) {
        const ExpertLayer & L = kv.second;
        if (L.gated() == (cfg_.activation == Activation::ReLU2)) {
            continue;  // forward() refuses this layer/activation pair; nothing to size
        }
        const int64_t top_k = std::min(cfg_.max_top_k, L.n_expert);
        for (Layout layout : { Layout::Mapped, Layout::Repacked }) {
            ggml_reset(ctx_);
            Graph g = build(L, cfg_.chunk, top_k, GGML_TYPE_BF16, GGML_TYPE_F32, layout);
            scratch = std::max(scratch, intermediate_bytes(g));
            ggml_cplan plan = ggml_graph_plan(g.graph, cfg_.n_threads, pool_->get());
            work = std::max(work, plan.work_size);
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

size_t MoeEngine::scratch_bytes() const { return ggml_backend_buffer_get_size(scratch_) + work_.size(); }

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
    if (!twin || !store_->keeps_mapped()) {
        return twin ? twin : t;
    }
    if (layout == Layout::BySize) {
        const int64_t limit = cfg_.repack_max_tokens >= 0 ? cfg_.repack_max_tokens : default_repack_max_tokens(t->type);
        layout              = n_tokens <= limit ? Layout::Repacked : Layout::Mapped;
    }
    return layout == Layout::Repacked ? twin : t;
}

MoeEngine::Graph MoeEngine::build(const ExpertLayer & L, int64_t n, int64_t K, ggml_type x_type, ggml_type out_type,
                                  Layout layout) {
    ggml_context * ctx     = ctx_;
    ggml_tensor *  gate    = weights_for(L.gate, n, layout);
    ggml_tensor *  up_w    = weights_for(L.up, n, layout);
    ggml_tensor *  gate_up = weights_for(L.gate_up, n, layout);
    ggml_tensor *  down_w  = weights_for(L.down, n, layout);
    Graph          g;
    g.x       = ggml_new_tensor_3d(ctx, x_type, L.n_embd, 1, n);
    g.ids     = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, n);
    g.weights = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, K, n);
    ggml_tensor * x = x_type == GGML_TYPE_F32 ? g.x : ggml_cast(ctx, g.x, GGML_TYPE_F32);

    ggml_tensor * h;
    if (gate_up) {
        ggml_tensor * gu = ggml_mul_mat_id(ctx, gate_up, x, g.ids);
        h = cfg_.activation == Activation::SiLU ? ggml_swiglu(ctx, gu) : ggml_geglu(ctx, gu);
    } else if (gate) {
        ggml_tensor * gt = ggml_mul_mat_id(ctx, gate, x, g.ids);
        ggml_tensor * up = ggml_mul_mat_id(ctx, up_w, x, g.ids);
        h = cfg_.activation == Activation::SiLU ? ggml_swiglu_split(ctx, gt, up) : ggml_geglu_split(ctx, gt, up);
    } else {
        ggml_tensor * up = ggml_mul_mat_id(ctx, up_w, x, g.ids);
        h = ggml_sqr(ctx, ggml_relu(ctx, up));
    }
    ggml_tensor * down = ggml_mul_mat_id(ctx, down_w, h, g.ids);
    ggml_tensor * args[2] = { down, g.weights };
    g.out   = ggml_custom_4d(ctx, out_type, L.n_embd, n, 1, 1, args, 2, combine, GGML_N_TASKS_MAX, nullptr);
    g.graph = ggml_new_graph_custom(ctx, kMaxNodes, false);
    ggml_build_forward_expand(g.graph, g.out);
    return g;
}

size_t MoeEngine::intermediate_bytes(const Graph & g) const {
    ggml_backend_buffer_type_t buft  = ggml_backend_cpu_buffer_type();
    const size_t               align = ggml_backend_buft_get_alignment(buft);
    size_t                     total = 0;
    for (int i = 0; i < ggml_graph_n_nodes(g.graph); ++i) {
        ggml_tensor * t = ggml_graph_node(g.graph, i);
        if (t != g.out && !t->view_src) {
            total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
        }
    }
    return total;
}

void MoeEngine::allocate_intermediates(const Graph & g) {
    ggml_tallocr alloc = ggml_tallocr_new(scratch_);
    for (int i = 0; i < ggml_graph_n_nodes(g.graph); ++i) {
        ggml_tensor * t = ggml_graph_node(g.graph, i);
        if (t->data) {
            continue;
        }
        if (ggml_tallocr_alloc(&alloc, t) != GGML_STATUS_SUCCESS) {
            fail(ErrorKind::Runtime, "internal error: MoE scratch too small for node " + std::string(ggml_op_desc(t)));
        }
    }
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
    if (K < 1 || K > cfg_.max_top_k || K > L.n_expert) {
        fail(ErrorKind::Value, where + "topk_ids has " + std::to_string(K) + " experts per token; expected 1.." +
                                   std::to_string(std::min(cfg_.max_top_k, L.n_expert)) +
                                   " (max_top_k=" + std::to_string(cfg_.max_top_k) + ", " +
                                   std::to_string(L.n_expert) + " experts in the layer)");
    }
    if (weights.cols != K) {
        fail(ErrorKind::Value, where + "topk_weights must be [tokens, " + std::to_string(K) + "] like topk_ids, found [" +
                                   std::to_string(weights.rows) + ", " + std::to_string(weights.cols) + "]");
    }
    if (out.cols != L.n_embd) {
        fail(ErrorKind::Value, where + "out must be [tokens, " + std::to_string(L.n_embd) + "], found [" +
                                   std::to_string(out.rows) + ", " + std::to_string(out.cols) + "]");
    }
    if (L.gated() && cfg_.activation == Activation::ReLU2) {
        fail(ErrorKind::Value, where + "the experts are gated (gate and up tensors); activation 'relu2' is for "
                                       "up/down-only experts: use 'silu' or 'gelu'");
    }
    if (!L.gated() && cfg_.activation != Activation::ReLU2) {
        fail(ErrorKind::Value, where + "the experts have no gate tensor (up/down only); they need activation "
                                       "'relu2', not '" + std::string(activation_name(cfg_.activation)) + "'");
    }
    for (int64_t i = 0; i < T * K; ++i) {
        const int64_t e = ids.type == GGML_TYPE_I32 ? ((const int32_t *) ids.data)[i] : ((const int64_t *) ids.data)[i];
        if (e < 0 || e >= L.n_expert) {
            fail(ErrorKind::Index, where + "topk_ids[" + std::to_string(i / K) + ", " + std::to_string(i % K) +
                                       "] = " + std::to_string(e) + " is not an expert index: expected 0.." +
                                       std::to_string(L.n_expert - 1));
        }
    }
}

// Copies one chunk's routing into the engine's int32/f32 buffers. A row that names an expert
// twice gets the weights summed on the first slot and each repeat replaced by an expert absent
// from the row with weight 0: ggml's repacked MUL_MAT_ID assumes distinct experts per token.
void MoeEngine::stage_routing(const Matrix & ids, const Matrix & weights, int64_t t0, int64_t n, int64_t n_expert) {
    const int64_t K = ids.cols;
    for (int64_t i = 0; i < n * K; ++i) {
        const int64_t j = t0 * K + i;
        ids_i32_[i] = ids.type == GGML_TYPE_I32 ? ((const int32_t *) ids.data)[j] : (int32_t) ((const int64_t *) ids.data)[j];
    }
    to_f32((const char *) weights.data + t0 * K * ggml_type_size(weights.type), weights.type, weights_f32_.data(), n * K);
    for (int64_t t = 0; t < n; ++t) {
        int32_t * row = ids_i32_.data() + t * K;
        float *   w   = weights_f32_.data() + t * K;
        for (int64_t k = 1; k < K; ++k) {
            const int64_t first = std::find(row, row + k, row[k]) - row;
            if (first == k) {
                continue;
            }
            w[first] += w[k];
            w[k] = 0.0f;
            int32_t e = 0;
            while (e < n_expert && std::find(row, row + K, e) != row + K) {
                ++e;
            }
            row[k] = e;  // K <= n_expert, so a free expert exists
        }
    }
}

void MoeEngine::forward(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights, const Matrix & out) {
    std::lock_guard<std::mutex> lock(mutex_);
    validate(layer, x, ids, weights, out);
    const ExpertLayer & L = store_->layer(layer);
    const int64_t       T = x.rows, K = ids.cols;
    const size_t        x_row   = ggml_row_size(x.type, L.n_embd);
    const size_t        out_row = ggml_row_size(out.type, L.n_embd);

    for (int64_t t0 = 0; t0 < T; t0 += cfg_.chunk) {
        const int64_t n = std::min(cfg_.chunk, T - t0);
        ggml_reset(ctx_);
        Graph g = build(L, n, K, x.type, out.type, Layout::BySize);
        g.x->data   = (char *) x.data + t0 * x_row;
        g.out->data = (char *) out.data + t0 * out_row;
        stage_routing(ids, weights, t0, n, L.n_expert);
        g.ids->data     = ids_i32_.data();
        g.weights->data = weights_f32_.data();
        allocate_intermediates(g);
        compute(g);
    }
}

}  // namespace lvgg
