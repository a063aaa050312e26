// Threads for the CPU expert engine: which CPUs this process may use, how many physical
// cores that is, and the ggml thread pool built from them. Threading lives here only; the
// MoE code receives a ready pool.
//
// Two builds (CMakeLists.txt says which is chosen where, and why):
// - OpenMP: ggml shares torch's runtime (torch loads libgomp.so.1 first), so a graph runs on
//   the calling thread's OpenMP team, the threads torch uses for its CPU ops; idle threads
//   follow OpenMP's wait policy (libgomp: a short spin, then sleep).
// - ggml's thread pool: workers of our own that spin briefly after a graph, then sleep.
#pragma once

#include <ggml-cpu.h>

#include <vector>

namespace lvgg {

// CPUs in this process's affinity set, ascending.
std::vector<int> process_cpus();

// Bind the calling thread to `cpus` (none: leave it where it may run); throws where the OS refuses.
void bind_thread(const std::vector<int> & cpus);

// The first logical CPU of every physical core among `cpus` (SMT siblings dropped).
std::vector<int> one_cpu_per_core(const std::vector<int> & cpus);

class ThreadPool {
  public:
    // n_threads <= 0: one thread per physical core of `cpus` (default: the process's CPU set).
    // Explicit `cpus` pin the team's threads to them (strict_cpu: one CPU per thread); without
    // them no affinity is touched (vLLM binds its OpenMP threads itself).
    ThreadPool(int n_threads, std::vector<int> cpus, bool strict_cpu);
    // True in the OpenMP build.
    static bool openmp();
    // LVGG_POWER_SAVING=1: ggml's pool does not poll between graphs (its idle workers sleep at
    // once; a step starts a little later). The OpenMP build follows OMP_WAIT_POLICY instead.
    static bool power_saving();
    ~ThreadPool();
    ThreadPool(const ThreadPool &)             = delete;
    ThreadPool & operator=(const ThreadPool &) = delete;

    ggml_threadpool *        get() const { return pool_; }
    int                      n_threads() const { return n_threads_; }
    const std::vector<int> & cpus() const { return cpus_; }
    // Where the thread that computes a graph should run: it is the pool's first worker (ggml's
    // workers are the others), so the CPUs ggml gives that worker, the first one (strict_cpu) or
    // all of them; empty where the pool is not pinned, and in the OpenMP build (its team is the
    // caller's).
    const std::vector<int> & caller_cpus() const { return caller_cpus_; }

  private:
    ggml_threadpool * pool_ = nullptr;
    int               n_threads_;
    std::vector<int>  cpus_;
    std::vector<int>  caller_cpus_;
};

}  // namespace lvgg
