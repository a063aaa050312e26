// The CPU engine in the stream order of a CUDA stream, with no synchronization: the caller
// copies a layer's inputs into pinned host buffers on the stream, `enqueue` adds a host
// function to the same stream that computes the layer on the CPU into a pinned output
// buffer, and the caller copies that back on the stream. All of it can be captured into a
// CUDA graph: a job (layer, token count) is built once and never changes, so a graph replays
// the host function with the buffers' new contents.
//
// libcuda.so.1 is opened at run time, on first use: builds and machines without CUDA need
// nothing of it.
#pragma once

#include "moe_engine.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace lvgg {

class CudaBridge {
  public:
    // x, ids, weights, out: pinned host buffers of max_tokens rows (the engine's limit or less).
    CudaBridge(Experts & engine, const Matrix & x, const Matrix & ids, const Matrix & weights, const Matrix & out);

    // Adds to `stream` (a CUstream / cudaStream_t) the computation of `layer` for the first
    // `n_tokens` rows of the buffers. Raises the error of an earlier host function, if any.
    void enqueue(uintptr_t stream, int layer, int64_t n_tokens);

    // Raises (once) the error a host function met since the last check.
    void check();

  private:
    struct Job {
        CudaBridge * bridge;
        int          layer;
        Matrix       x, ids, weights, out;
    };
    static void run(void * job);

    Experts &                             engine_;
    Matrix                                x_, ids_, weights_, out_;
    std::unordered_map<int64_t, Job>      jobs_;  // by (layer, n_tokens); nodes never move
    std::mutex                            jobs_mutex_;
    std::mutex                            error_mutex_;
    std::string                           error_;
};

}  // namespace lvgg
