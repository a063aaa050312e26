#include "threads.h"

#include "errors.h"

#include <ggml.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <utility>

namespace lvgg {

std::vector<int> process_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    std::vector<int> cpus;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        for (int c = 0; c < CPU_SETSIZE; ++c) {
            if (CPU_ISSET(c, &set)) {
                cpus.push_back(c);
            }
        }
    }
    return cpus;
}

static int read_int(const std::string & path, int fallback) {
    std::ifstream f(path);
    int           v;
    return (f >> v) ? v : fallback;
}

std::vector<int> one_cpu_per_core(const std::vector<int> & cpus) {
    std::set<std::pair<int, int>> seen;  // (package, core)
    std::vector<int>              out;
    for (int c : cpus) {
        const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
        const int         core = read_int(base + "core_id", c);
        const int         pkg  = read_int(base + "physical_package_id", 0);
        if (seen.insert({ pkg, core }).second) {
            out.push_back(c);
        }
    }
    return out;
}

ThreadPool::ThreadPool(int n_threads, std::vector<int> cpus, bool strict_cpu) {
    const std::vector<int> allowed = process_cpus();
    const bool             pinned  = !cpus.empty();
    if (!pinned) {
        cpus = one_cpu_per_core(allowed);
    } else {
        std::sort(cpus.begin(), cpus.end());
        if (std::adjacent_find(cpus.begin(), cpus.end()) != cpus.end()) {
            fail(ErrorKind::Value, "cpus: each CPU may be listed once; found a duplicate");
        }
        for (int c : cpus) {
            if (std::find(allowed.begin(), allowed.end(), c) == allowed.end()) {
                fail(ErrorKind::Value, "cpus: CPU " + std::to_string(c) +
                                           " is not in this process's CPU set (" + std::to_string(allowed.size()) +
                                           " CPUs allowed); pick CPUs from os.sched_getaffinity(0)");
            }
        }
    }
    if (cpus.empty()) {
        fail(ErrorKind::Runtime, "no CPU available to this process");
    }
    if (n_threads <= 0) {
        n_threads = (int) cpus.size();
    }
    if (n_threads > (int) cpus.size()) {
        fail(ErrorKind::Value, "threads=" + std::to_string(n_threads) + " but only " + std::to_string(cpus.size()) +
                                   " CPUs are given: ggml's barrier spins, so more threads than free cores "
                                   "slows every step down; use at most " +
                                   std::to_string(cpus.size()));
    }
    for (int c : cpus) {
        if (c >= GGML_MAX_N_THREADS) {
            fail(ErrorKind::Value, "CPU id " + std::to_string(c) + " is beyond ggml's cpumask (" +
                                       std::to_string(GGML_MAX_N_THREADS) + " CPUs)");
        }
    }
    n_threads_ = n_threads;
    cpus_      = std::move(cpus);
    if (pinned && !openmp()) {
        caller_cpus_ = strict_cpu ? std::vector<int>{ cpus_[0] } : cpus_;
    }

    ggml_threadpool_params params = ggml_threadpool_params_default(n_threads_);
    if (power_saving()) {
        params.poll = 0;  // idle workers sleep at once instead of polling for the next graph
    }
    if (pinned) {
        for (int c : cpus_) {
            params.cpumask[c] = true;
        }
        params.strict_cpu = strict_cpu;
    }
    // ggml binds the thread that makes a pool to its first worker's CPUs (that thread computes
    // its graphs in llama.cpp); here the maker is the caller's (vLLM's) thread, which keeps its own.
    cpu_set_t maker_cpus;
    const bool keep = pthread_getaffinity_np(pthread_self(), sizeof(maker_cpus), &maker_cpus) == 0;
    pool_           = ggml_threadpool_new(&params);
    if (keep) {
        pthread_setaffinity_np(pthread_self(), sizeof(maker_cpus), &maker_cpus);
    }
    if (!pool_) {
        fail(ErrorKind::Runtime, "ggml could not start a thread pool of " + std::to_string(n_threads_) + " threads");
    }
}

// Bind the calling thread to `cpus` (none: leave it where it may run).
void bind_thread(const std::vector<int> & cpus) {
    if (cpus.empty()) {
        return;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int c : cpus) {
        CPU_SET(c, &set);
    }
    if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0) {
        fail(ErrorKind::Runtime, "could not bind a thread to CPUs " + std::to_string(cpus.front()) + "..: " +
                                     std::strerror(errno));
    }
}

bool ThreadPool::power_saving() {
    const char * v = std::getenv("LVGG_POWER_SAVING");
    return v && *v && std::string(v) != "0" && std::string(v) != "false";
}

bool ThreadPool::openmp() {
#ifdef LVGG_OPENMP
    return true;
#else
    return false;
#endif
}

ThreadPool::~ThreadPool() {
    if (pool_) {
        ggml_threadpool_free(pool_);
    }
}

}  // namespace lvgg
