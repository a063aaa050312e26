#include "cuda_bridge.h"

#include "errors.h"

#include <dlfcn.h>

#include <cmath>
#include <cstring>
#include <exception>
#include <limits>

namespace lvgg {

namespace {

// The two driver entry points the bridge uses (CUDA 10+ ABI).
using CUresult = int;
using CUstream = void *;
using CUhostFn = void (*)(void *);

struct CudaDriver {
    CUresult (*launch_host_func)(CUstream, CUhostFn, void *)  = nullptr;
    CUresult (*get_error_string)(CUresult, const char **)     = nullptr;
};

const CudaDriver & driver() {
    static const CudaDriver d = [] {
        CudaDriver out;
        void *     lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            fail(ErrorKind::Runtime, std::string("the CUDA bridge needs the NVIDIA driver (libcuda.so.1): ") +
                                         dlerror() + "; on a machine without a GPU pass CPU tensors");
        }
        out.launch_host_func = reinterpret_cast<decltype(out.launch_host_func)>(dlsym(lib, "cuLaunchHostFunc"));
        out.get_error_string = reinterpret_cast<decltype(out.get_error_string)>(dlsym(lib, "cuGetErrorString"));
        if (!out.launch_host_func || !out.get_error_string) {
            fail(ErrorKind::Runtime, "libcuda.so.1 has no cuLaunchHostFunc: the CUDA bridge needs a driver for CUDA 10 "
                                     "or newer");
        }
        return out;
    }();
    return d;
}

Matrix first_rows(const Matrix & m, int64_t rows) {
    Matrix out = m;
    out.rows   = rows;
    return out;
}

// Poison a failed layer's output so nothing downstream mistakes it for a result.
void fill_nan(const Matrix & out) {
    const size_t n = (size_t) (out.rows * out.cols);
    if (out.type == GGML_TYPE_F32) {
        std::fill_n((float *) out.data, n, std::numeric_limits<float>::quiet_NaN());
    } else {  // f16 and bf16: all-ones exponent with a mantissa bit is NaN in both
        std::fill_n((uint16_t *) out.data, n, out.type == GGML_TYPE_F16 ? 0x7e00 : 0x7fc0);
    }
}

}  // namespace

CudaBridge::CudaBridge(Experts & engine, const Matrix & x, const Matrix & ids, const Matrix & weights,
                       const Matrix & out) :
    engine_(engine),
    x_(x),
    ids_(ids),
    weights_(weights),
    out_(out) {
    if (x.rows != ids.rows || x.rows != weights.rows || x.rows != out.rows) {
        fail(ErrorKind::Value, "the pinned buffers must have the same number of rows; found " + std::to_string(x.rows) +
                                   ", " + std::to_string(ids.rows) + ", " + std::to_string(weights.rows) + ", " +
                                   std::to_string(out.rows));
    }
    if (x.rows > engine.max_tokens()) {
        fail(ErrorKind::Value, "the pinned buffers have " + std::to_string(x.rows) + " rows, more than the engine's "
                                   "max_tokens=" + std::to_string(engine.max_tokens()));
    }
    driver();
}

void CudaBridge::enqueue(uintptr_t stream, int layer, int64_t n_tokens) {
    check();
    if (n_tokens < 1 || n_tokens > x_.rows) {
        fail(ErrorKind::Value, "n_tokens=" + std::to_string(n_tokens) + " but the pinned buffers hold 1.." +
                                   std::to_string(x_.rows) + " rows");
    }
    Job * job;
    {
        std::lock_guard<std::mutex> lock(jobs_mutex_);
        const int64_t key = (int64_t) layer * (x_.rows + 1) + n_tokens;
        auto          it  = jobs_.find(key);
        if (it == jobs_.end()) {
            Job j{ this, layer, first_rows(x_, n_tokens), first_rows(ids_, n_tokens), first_rows(weights_, n_tokens),
                   first_rows(out_, n_tokens) };
            engine_.validate(layer, j.x, j.ids, j.weights, j.out);
            it = jobs_.emplace(key, j).first;
        }
        job = &it->second;
    }
    const CUresult rc = driver().launch_host_func((CUstream) stream, &CudaBridge::run, job);
    if (rc != 0) {
        const char * what = nullptr;
        driver().get_error_string(rc, &what);
        fail(ErrorKind::Runtime, std::string("cuLaunchHostFunc failed: ") + (what ? what : "unknown CUDA error") +
                                     " (error " + std::to_string(rc) + ")");
    }
}

void CudaBridge::run(void * p) {
    Job & job = *static_cast<Job *>(p);
    try {
        job.bridge->engine_.forward(job.layer, job.x, job.ids, job.weights, job.out);
    } catch (const std::exception & e) {
        fill_nan(job.out);
        std::lock_guard<std::mutex> lock(job.bridge->error_mutex_);
        if (job.bridge->error_.empty()) {
            job.bridge->error_ = e.what();
        }
    }
}

void CudaBridge::check() {
    std::string error;
    {
        std::lock_guard<std::mutex> lock(error_mutex_);
        error.swap(error_);
    }
    if (!error.empty()) {
        fail(ErrorKind::Runtime, "the CPU experts failed in a CUDA host function (that layer's output is NaN): " + error);
    }
}

}  // namespace lvgg
