// The CPU engine in the stream order of a CUDA stream, with no synchronization: the caller
// copies a layer's inputs into pinned host buffers on the stream, `enqueue` adds to the same
// stream what makes the CPU compute the layer into a pinned output buffer, and the caller
// copies that back on the stream. All of it can be captured into a CUDA graph: a job (layer,
// token count) is fixed when enqueued, so a graph replays it with the buffers' new contents.
// A job may also be counted: the caller copies how many of its rows are real into a pinned
// word first (vLLM pads a batch to the size its graph was captured for), and the CPU computes
// only those; the rest of the output comes back 0.
//
// Two ways to hand a job to the CPU:
// - flags (`request` and `done` given): the stream writes the job's id into a pinned word that a thread of
//   the bridge polls, then waits (cuStreamWaitValue32) until that thread writes the id into a
//   second word once the output is ready. The thread spins while jobs keep coming and naps when
//   idle. Microseconds per layer.
// - host functions (no flags given): cuLaunchHostFunc runs the job on the driver's callback
//   thread. No thread of ours, but the driver takes tens of microseconds per call to start it
//   and resume the stream.
//
// libcuda.so.1 is opened at run time, on first use: builds and machines without CUDA need
// nothing of it.
#pragma once

#include "moe_engine.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

namespace lvgg {

// Copies `height` rows of `width` bytes from host memory (rows `src_pitch` bytes apart) to
// device memory (rows `dst_pitch` apart) on `stream` (a CUstream): by the copy engine,
// asynchronously where the host memory is pinned (registered).
void copy_rows_to_device(uintptr_t dst, size_t dst_pitch, uintptr_t src, size_t src_pitch, size_t width,
                         size_t height, uintptr_t stream);

// Page-locks `size` bytes of host memory at `address` for CUDA (cuMemHostRegister's flags, the
// same values as cudaHostRegister's), in the calling thread's current context. Through the
// driver: a failure raises here and leaves nothing behind, where the runtime's cudaHostRegister
// would also leave its error for the runtime's next call (torch's next kernel) to report.
void register_host_memory(uintptr_t address, size_t size, unsigned flags);
void unregister_host_memory(uintptr_t address);

class CudaBridge {
  public:
    // x, ids, weights, out: pinned host buffers of max_tokens rows (the engine's limit or less).
    // request, done: nullptr (host functions), or two uint32 words in pinned, mapped host memory,
    // on cache lines of their own; flags need a driver with stream memory operations (CUDA
    // 11.7+), else host functions are used (`flags()` says which). real_rows: a pinned int32
    // word that counted jobs read (nullptr: no job may be counted).
    CudaBridge(Experts & engine, const Matrix & x, const Matrix & ids, const Matrix & weights, const Matrix & out,
               uint32_t * request = nullptr, uint32_t * done = nullptr, const int32_t * real_rows = nullptr);
    ~CudaBridge();
    CudaBridge(const CudaBridge &)             = delete;
    CudaBridge & operator=(const CudaBridge &) = delete;

    // Adds to `stream` (a CUstream / cudaStream_t) the computation of `layer` for the first
    // `n_tokens` rows of the buffers; `counted`: for the first real_rows of them, when the word
    // then holds 0..n_tokens-1 (any other value: all). Raises the error of an earlier job, if any.
    void enqueue(uintptr_t stream, int layer, int64_t n_tokens, bool counted = false);

    // Raises (once) the error a job met since the last check.
    void check();

    bool flags() const { return request_ != nullptr; }

  private:
    struct Job {
        CudaBridge * bridge;
        int          layer;
        bool         counted;
        Matrix       x, ids, weights, out;
    };
    static void run(void * job);
    Job         job_for(uint32_t id);  // id = (layer, n_tokens, counted) as enqueue numbers it
    void        serve();                      // the thread that answers flags

    Experts &                             engine_;
    Matrix                                x_, ids_, weights_, out_;
    const int32_t *                       real_rows_;
    std::unordered_map<int64_t, Job>      jobs_;  // by (layer, n_tokens, counted); nodes never move
    std::mutex                            jobs_mutex_;
    std::mutex                            error_mutex_;
    std::string                           error_;
    uint32_t *                            request_ = nullptr;  // flags: host addresses
    uint32_t *                            done_    = nullptr;
    uint64_t                              request_dev_ = 0;  // and device ones
    uint64_t                              done_dev_    = 0;
    std::atomic<bool>                     stop_{ false };
    std::thread                           server_;
};

}  // namespace lvgg
