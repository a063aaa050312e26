// SplitEngine: one MoE engine per NUMA node, each on its own share of every expert.
//
// Node n holds ExpertStore::part_shape(n) by rows of every expert (ExpertStore's part
// constructor), in memory placed on the node: the part is
// built by a thread bound to the node's CPUs, with the node's memory preferred
// (set_mempolicy) when one is named, so pages land there at first touch. Each node computes
// its partial output [T, D] in float32 with its own threads (pinned to its CPUs; node 0's
// first thread is the caller's, as with one engine, the others' a driver thread each); the
// parts are summed into out. Where every part ends on a block of down, each node's dot products
// are the full computation's, split: results equal one engine's up to the order of float32
// additions; a part padding a block quantizes its activations with scales of its own.
#pragma once

#include "moe_engine.h"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace lvgg {

struct NodePlan {
    std::vector<int> cpus;           // the node's CPUs; its threads and its driver run there (none: unbound)
    int              n_threads = 0;  // <= 0: one per CPU given (then cpus are needed)
    int              mem_node  = -1; // NUMA node whose memory holds the part; < 0: the CPUs' own
};

class SplitEngine : public Experts {
  public:
    // cfg: the settings of every node's engine (its cpus and threads come from the plan). The
    // parts are copies: `whole` is needed only while this is made.
    SplitEngine(const std::shared_ptr<ExpertStore> & whole, const std::vector<NodePlan> & nodes, const EngineConfig & cfg,
                bool repack);
    ~SplitEngine() override;
    SplitEngine(const SplitEngine &)             = delete;
    SplitEngine & operator=(const SplitEngine &) = delete;

    void forward(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                 const Matrix & out) override;
    void validate(int layer, const Matrix & x, const Matrix & ids, const Matrix & weights,
                  const Matrix & out) const override;
    int64_t max_tokens() const override { return config().max_tokens; }
    // The caller computes node 0's part.
    const std::vector<int> & caller_cpus() const override { return engines_[0]->caller_cpus(); }
    void set_activation(int layer, Activation act) override {
        for (auto & e : engines_) {
            e->set_activation(layer, act);
        }
    }
    Activation activation(int layer) const override { return engines_[0]->activation(layer); }

    int                  n_nodes() const { return (int) engines_.size(); }
    const MoeEngine &    node(int i) const { return *engines_.at(i); }
    const EngineConfig & config() const { return engines_[0]->config(); }
    // Where part i's expert bytes are (for placement checks): [address, bytes] of each tensor.
    std::vector<std::pair<uintptr_t, size_t>> part_memory(int i) const;

  private:
    void worker(int i);
    // Until pred(): spin briefly (unless power saving), then sleep on `cv`.
    template <typename Pred> void await(std::condition_variable & cv, Pred pred);

    std::vector<std::unique_ptr<MoeEngine>> engines_;
    std::vector<NodePlan>                   plans_;
    std::vector<std::vector<float>>         partial_;  // [max_tokens, D] per node
    std::vector<float>                      sum_;      // one row of out, summed
    std::vector<std::thread>                workers_;

    // A job is published by bumping generation_; workers and the caller spin briefly on these
    // counters before sleeping on the condition variables (one futex hand-off per node and layer
    // costs ~0.1 ms at decode otherwise), except under LVGG_POWER_SAVING.
    std::mutex              call_mutex_;  // one forward at a time
    std::mutex              mutex_;       // sleeping and waking
    std::condition_variable start_, done_;
    std::atomic<uint64_t>   generation_{ 0 };
    std::atomic<int>        pending_{ 0 };
    std::atomic<bool>       stop_{ false };
    bool                    spin_ = true;
    int                     layer_      = 0;
    Matrix                  x_, ids_, weights_;
    std::vector<std::exception_ptr> errors_;
};

}  // namespace lvgg
