#include "split_engine.h"

#include "errors.h"

#include <ggml.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace lvgg {

namespace {

// Prefer `node`'s memory for the calling thread's new pages (<0: the default policy again).
// A raw syscall: no libnuma needed. Returns false where the kernel refuses (e.g. no NUMA).
bool prefer_memory_of(int node) {
    constexpr int MPOL_DEFAULT = 0, MPOL_PREFERRED = 1;
    if (node < 0) {
        return syscall(SYS_set_mempolicy, MPOL_DEFAULT, nullptr, 0) == 0;
    }
    unsigned long mask[16] = {};  // 1024 nodes
    if (node >= (int) (sizeof(mask) * 8)) {
        fail(ErrorKind::Value, "NUMA node " + std::to_string(node) + " is beyond the 1024 lvgg supports");
    }
    mask[node / (8 * sizeof(unsigned long))] |= 1UL << (node % (8 * sizeof(unsigned long)));
    return syscall(SYS_set_mempolicy, MPOL_PREFERRED, mask, sizeof(mask) * 8 + 1) == 0;
}

// Spin until pred() or ~0.2 ms passed; true when pred() became true.
template <typename Pred> bool spin_until(Pred pred) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
    for (int i = 0;; ++i) {
        if (pred()) {
            return true;
        }
        if ((i & 63) == 0 && std::chrono::steady_clock::now() > deadline) {
            return false;
        }
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
}

}  // namespace

template <typename Pred> void SplitEngine::await(std::condition_variable & cv, Pred pred) {
    if (!spin_ || !spin_until(pred)) {
        std::unique_lock<std::mutex> lock(mutex_);
        cv.wait(lock, pred);
    }
}

SplitEngine::SplitEngine(const std::shared_ptr<ExpertStore> & whole, const std::vector<NodePlan> & nodes,
                         const EngineConfig & cfg, bool repack) :
    plans_(nodes) {
    const int n = (int) plans_.size();
    if (n < 2) {
        fail(ErrorKind::Value, "a split engine needs at least 2 nodes, got " + std::to_string(n) +
                                   "; use one engine (MoeEngine) for one node");
    }
    std::vector<int> owner(CPU_SETSIZE, -1);
    for (int i = 0; i < n; ++i) {
        if (plans_[i].cpus.empty() && plans_[i].n_threads <= 0) {
            fail(ErrorKind::Value, "node " + std::to_string(i) + " has neither CPUs nor a thread count; give one");
        }
        for (int c : plans_[i].cpus) {
            if (c < 0 || c >= CPU_SETSIZE) {
                fail(ErrorKind::Value, "node " + std::to_string(i) + ": CPU " + std::to_string(c) + " does not exist");
            }
            if (owner[c] >= 0) {
                fail(ErrorKind::Value, "CPU " + std::to_string(c) + " is in node " + std::to_string(owner[c]) +
                                           " and node " + std::to_string(i) + "; nodes must not share CPUs");
            }
            owner[c] = i;
        }
    }
    for (const auto & kv : whole->layers()) {
        ExpertStore::part_range(kv.second, n - 1, n);  // fails first when a layer is too small to split
    }

    // Build every node's part and engine on a thread bound to the node, all nodes at once.
    engines_.resize(n);
    std::vector<std::exception_ptr> failed(n);
    std::vector<std::thread>        builders;
    for (int i = 0; i < n; ++i) {
        builders.emplace_back([&, i] {
            try {
                bind_thread(plans_[i].cpus);
                prefer_memory_of(plans_[i].mem_node);
                auto part = std::make_shared<ExpertStore>(*whole, i, n, repack);
                EngineConfig c = cfg;
                c.cpus         = plans_[i].cpus;
                c.n_threads    = plans_[i].n_threads;
                engines_[i]    = std::make_unique<MoeEngine>(std::move(part), c);
                prefer_memory_of(-1);
            } catch (...) {
                failed[i] = std::current_exception();
            }
        });
    }
    for (auto & t : builders) {
        t.join();
    }
    for (auto & e : failed) {
        if (e) {
            std::rethrow_exception(e);
        }
    }
    int64_t max_embd = 0;
    for (const auto & kv : whole->layers()) {
        max_embd = std::max(max_embd, kv.second.n_embd);
    }
    partial_.assign(n, std::vector<float>(engines_[0]->config().max_tokens * max_embd));
    sum_.resize(max_embd);
    errors_.resize(n);
    spin_ = !ThreadPool::power_saving();
    for (int i = 1; i < n; ++i) {  // node 0 runs on the caller, as one engine would
        workers_.emplace_back(&SplitEngine::worker, this, i);
    }
}

SplitEngine::~SplitEngine() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    start_.notify_all();
    for (auto & t : workers_) {
        t.join();
    }
}

void SplitEngine::worker(int i) {
    try {
        bind_thread(plans_[i].cpus);  // ggml's calling thread is the node's first worker
    } catch (...) {
        // A thread that cannot bind still computes correctly; its node's memory is only farther.
    }
    uint64_t seen = 0;
    for (;;) {
        await(start_, [&] { return stop_.load() || generation_.load(std::memory_order_acquire) != seen; });
        if (stop_) {
            return;
        }
        seen = generation_.load(std::memory_order_acquire);
        const Matrix part = { partial_[i].data(), GGML_TYPE_F32, x_.rows, x_.cols };
        try {
            errors_[i] = nullptr;
            engines_[i]->run(layer_, x_, ids_, weights_, part);
        } catch (...) {
            errors_[i] = std::current_exception();
        }
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            std::lock_guard<std::mutex> lock(mutex_);
            done_.notify_one();
        }
    }
}

void SplitEngine::validate(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                           const Matrix & out) const {
    engines_[0]->validate(layer, x, ids, weights, out);
}

void SplitEngine::forward(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                          const Matrix & out) {
    std::lock_guard<std::mutex> call(call_mutex_);
    validate(layer, x, ids, weights, out);
    engines_[0]->check_ids(layer, ids);
    const auto start = std::chrono::steady_clock::now();
    layer_ = layer;
    x_ = x, ids_ = ids, weights_ = weights;
    pending_.store(n_nodes() - 1, std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lock(mutex_);
        generation_.fetch_add(1, std::memory_order_release);
    }
    start_.notify_all();
    try {
        errors_[0] = nullptr;
        engines_[0]->run(layer, x, ids, weights, { partial_[0].data(), GGML_TYPE_F32, x.rows, x.cols });
    } catch (...) {
        errors_[0] = std::current_exception();
    }
    await(done_, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    for (auto & e : errors_) {
        if (e) {
            std::rethrow_exception(e);
        }
    }
    // out = sum of the parts, in the caller's dtype
    const int64_t T = x.rows, D = x.cols;
    float *       row = sum_.data();
    for (int64_t t = 0; t < T; ++t) {
        std::copy_n(partial_[0].data() + t * D, D, row);
        for (int i = 1; i < n_nodes(); ++i) {
            const float * p = partial_[i].data() + t * D;
            for (int64_t d = 0; d < D; ++d) {
                row[d] += p[d];
            }
        }
        if (out.type == GGML_TYPE_F32) {
            std::copy_n(row, D, (float *) out.data + t * D);
        } else if (out.type == GGML_TYPE_F16) {
            ggml_fp32_to_fp16_row(row, (ggml_fp16_t *) out.data + t * D, D);
        } else {
            ggml_fp32_to_bf16_row(row, (ggml_bf16_t *) out.data + t * D, D);
        }
    }
    stats.record(std::chrono::steady_clock::now() - start, x.rows);
}

std::vector<std::pair<uintptr_t, size_t>> SplitEngine::part_memory(int i) const {
    const ExpertStore & part = *engines_.at(i)->store();
    std::vector<std::pair<uintptr_t, size_t>> out;
    for (const auto & kv : part.layers()) {
        for (ggml_tensor * t : kv.second.tensors()) {
            ggml_tensor * live = part.repacked(t) ? part.repacked(t) : t;
            const uintptr_t end = (uintptr_t) ggml_backend_buffer_get_base(live->buffer) +
                                  ggml_backend_buffer_get_size(live->buffer);  // a packed twin starts 64-aligned inside
            out.emplace_back((uintptr_t) live->data, end - (uintptr_t) live->data);
        }
    }
    return out;
}

}  // namespace lvgg
