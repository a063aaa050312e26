// Threads for the CPU expert engine: which CPUs this process may use, how many physical
// cores that is, and the ggml thread pool built from them. Threading lives here only; the
// MoE code receives a ready pool.
#pragma once

#include <ggml-cpu.h>

#include <vector>

namespace lvgg {

// CPUs in this process's affinity set, ascending.
std::vector<int> process_cpus();

// The first logical CPU of every physical core among `cpus` (SMT siblings dropped).
std::vector<int> one_cpu_per_core(const std::vector<int> & cpus);

class ThreadPool {
  public:
    // n_threads <= 0: one thread per physical core of `cpus` (default: the process's CPU set).
    // poll: 0 = workers sleep between graphs, 100 = spin as long as ggml allows.
    ThreadPool(int n_threads, std::vector<int> cpus, int poll, bool strict_cpu);
    ~ThreadPool();
    ThreadPool(const ThreadPool &)             = delete;
    ThreadPool & operator=(const ThreadPool &) = delete;

    ggml_threadpool *        get() const { return pool_; }
    int                      n_threads() const { return n_threads_; }
    const std::vector<int> & cpus() const { return cpus_; }
    int                      poll() const { return poll_; }
    void                     pause();
    void                     resume();

  private:
    ggml_threadpool * pool_ = nullptr;
    int               n_threads_;
    std::vector<int>  cpus_;
    int               poll_;
};

}  // namespace lvgg
