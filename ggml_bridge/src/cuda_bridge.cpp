#include "cuda_bridge.h"

#include "errors.h"

#include <dlfcn.h>
#include <pthread.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>

namespace lvgg {

namespace {

// The driver entry points the bridge uses (CUDA 10+ ABI; the stream memory operations' v2
// entry points, on by default, since CUDA 11.7).
using CUresult    = int;
using CUstream    = void *;
using CUhostFn    = void (*)(void *);
using CUdeviceptr = uint64_t;
constexpr unsigned CU_STREAM_WAIT_VALUE_EQ = 0x1;
constexpr int      CU_MEMORYTYPE_HOST      = 1;
constexpr int      CU_MEMORYTYPE_DEVICE    = 2;

// cuda.h's CUDA_MEMCPY2D (its layout is part of the driver's ABI).
struct Memcpy2D {
    size_t      src_x, src_y;
    int         src_memory_type;
    const void * src_host;
    CUdeviceptr src_device;
    void *      src_array;
    size_t      src_pitch;
    size_t      dst_x, dst_y;
    int         dst_memory_type;
    void *      dst_host;
    CUdeviceptr dst_device;
    void *      dst_array;
    size_t      dst_pitch;
    size_t      width, height;
};

struct CudaDriver {
    CUresult (*launch_host_func)(CUstream, CUhostFn, void *)                    = nullptr;
    CUresult (*get_error_string)(CUresult, const char **)                       = nullptr;
    CUresult (*write_value32)(CUstream, CUdeviceptr, uint32_t, unsigned)        = nullptr;  // optional
    CUresult (*wait_value32)(CUstream, CUdeviceptr, uint32_t, unsigned)         = nullptr;  // optional
    CUresult (*host_device_pointer)(CUdeviceptr *, void *, unsigned)            = nullptr;  // optional
    CUresult (*memcpy_2d_async)(const Memcpy2D *, CUstream)                     = nullptr;
    CUresult (*host_register)(void *, size_t, unsigned)                         = nullptr;
    CUresult (*host_unregister)(void *)                                         = nullptr;
    CUresult (*current_context)(void **)                                        = nullptr;
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
        out.memcpy_2d_async  = reinterpret_cast<decltype(out.memcpy_2d_async)>(dlsym(lib, "cuMemcpy2DAsync_v2"));
        out.host_register    = reinterpret_cast<decltype(out.host_register)>(dlsym(lib, "cuMemHostRegister_v2"));
        out.host_unregister  = reinterpret_cast<decltype(out.host_unregister)>(dlsym(lib, "cuMemHostUnregister"));
        out.current_context  = reinterpret_cast<decltype(out.current_context)>(dlsym(lib, "cuCtxGetCurrent"));
        if (!out.launch_host_func || !out.get_error_string || !out.memcpy_2d_async || !out.host_register ||
            !out.host_unregister || !out.current_context) {
            fail(ErrorKind::Runtime, "libcuda.so.1 lacks cuLaunchHostFunc, cuMemcpy2DAsync_v2 or cuMemHostRegister_v2: "
                                     "the CUDA bridge needs a driver for CUDA 10 or newer");
        }
        out.write_value32 = reinterpret_cast<decltype(out.write_value32)>(dlsym(lib, "cuStreamWriteValue32_v2"));
        out.wait_value32  = reinterpret_cast<decltype(out.wait_value32)>(dlsym(lib, "cuStreamWaitValue32_v2"));
        out.host_device_pointer =
            reinterpret_cast<decltype(out.host_device_pointer)>(dlsym(lib, "cuMemHostGetDevicePointer_v2"));
        return out;
    }();
    return d;
}

void check_cuda(CUresult rc, const char * call) {
    if (rc != 0) {
        const char * what = nullptr;
        driver().get_error_string(rc, &what);
        fail(ErrorKind::Runtime, std::string(call) + " failed: " + (what ? what : "unknown CUDA error") + " (error " +
                                     std::to_string(rc) + ")");
    }
}

// A polling thread spins this long after its last job (decode steps come every few ms), then
// naps: briefly for a second, then longer, so an idle server costs almost nothing.
constexpr auto kSpin      = std::chrono::milliseconds(20);
constexpr auto kShortNap  = std::chrono::microseconds(20);
constexpr auto kLongNap   = std::chrono::microseconds(500);
constexpr auto kShortNaps = std::chrono::seconds(1);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
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

void need_context(const char * call) {
    void * context = nullptr;
    check_cuda(driver().current_context(&context), "cuCtxGetCurrent");
    if (!context) {
        fail(ErrorKind::Runtime, std::string(call) + " needs a current CUDA context in this thread; use the device "
                                                     "through torch in this thread first (torch.cuda.synchronize())");
    }
}

}  // namespace

void copy_rows_to_device(uintptr_t dst, size_t dst_pitch, uintptr_t src, size_t src_pitch, size_t width,
                         size_t height, uintptr_t stream) {
    if (!dst || !src || width == 0 || dst_pitch < width || src_pitch < width) {
        fail(ErrorKind::Value, "copy_rows_to_device: rows of " + std::to_string(width) + " bytes need non-null buffers "
                                   "and pitches of at least that; found pitches " + std::to_string(dst_pitch) +
                                   " (device) and " + std::to_string(src_pitch) + " (host)");
    }
    Memcpy2D copy{};
    copy.src_memory_type = CU_MEMORYTYPE_HOST;
    copy.src_host        = reinterpret_cast<const void *>(src);
    copy.src_pitch       = src_pitch;
    copy.dst_memory_type = CU_MEMORYTYPE_DEVICE;
    copy.dst_device      = dst;
    copy.dst_pitch       = dst_pitch;
    copy.width           = width;
    copy.height          = height;
    check_cuda(driver().memcpy_2d_async(&copy, reinterpret_cast<CUstream>(stream)), "cuMemcpy2DAsync");
}

void register_host_memory(uintptr_t address, size_t size, unsigned flags) {
    if (!address || size == 0) {
        fail(ErrorKind::Value, "register_host_memory: expected a non-null address and a size above 0, found " +
                                   std::to_string(size) + " bytes at " + std::to_string(address));
    }
    need_context("cuMemHostRegister");
    check_cuda(driver().host_register(reinterpret_cast<void *>(address), size, flags), "cuMemHostRegister");
}

void unregister_host_memory(uintptr_t address) {
    need_context("cuMemHostUnregister");
    check_cuda(driver().host_unregister(reinterpret_cast<void *>(address)), "cuMemHostUnregister");
}

CudaBridge::CudaBridge(Experts & engine, const Matrix & x, const Matrix & ids, const Matrix & weights,
                       const Matrix & out, uint32_t * request, uint32_t * done, const int32_t * real_rows) :
    engine_(engine),
    x_(x),
    ids_(ids),
    weights_(weights),
    out_(out),
    real_rows_(real_rows) {
    if (x.rows != ids.rows || x.rows != weights.rows || x.rows != out.rows) {
        fail(ErrorKind::Value, "the pinned buffers must have the same number of rows; found " + std::to_string(x.rows) +
                                   ", " + std::to_string(ids.rows) + ", " + std::to_string(weights.rows) + ", " +
                                   std::to_string(out.rows));
    }
    if (x.rows > engine.max_tokens()) {
        fail(ErrorKind::Value, "the pinned buffers have " + std::to_string(x.rows) + " rows, more than the engine's "
                                   "max_tokens=" + std::to_string(engine.max_tokens()));
    }
    const CudaDriver & cu = driver();
    if ((request == nullptr) != (done == nullptr)) {
        fail(ErrorKind::Value, "give both signal words (request and done) or neither");
    }
    // Flags where the driver has stream memory operations and maps the words for the device;
    // host functions otherwise (flags() says which).
    if (request && cu.write_value32 && cu.wait_value32 && cu.host_device_pointer &&
        cu.host_device_pointer(&request_dev_, request, 0) == 0 && cu.host_device_pointer(&done_dev_, done, 0) == 0) {
        request_ = request;
        done_    = done;
        __atomic_store_n(request_, 0u, __ATOMIC_RELAXED);
        __atomic_store_n(done_, 0u, __ATOMIC_RELAXED);
        server_ = std::thread(&CudaBridge::serve, this);
    }
}

CudaBridge::~CudaBridge() {
    if (server_.joinable()) {
        stop_.store(true, std::memory_order_relaxed);
        server_.join();
    }
}

// A job's number: 1 + (layer * (rows + 1) + n_tokens) * 2 + counted.
CudaBridge::Job CudaBridge::job_for(uint32_t id) {
    const int64_t key = ((int64_t) id - 1) / 2, rows = x_.rows + 1, n = key % rows;
    return Job{ this,
                (int) (key / rows),
                (id - 1) % 2 == 1,
                first_rows(x_, n),
                first_rows(ids_, n),
                first_rows(weights_, n),
                first_rows(out_, n) };
}

void CudaBridge::serve() {
    pthread_setname_np(pthread_self(), "lvgg-bridge");
    try {
        bind_thread(engine_.caller_cpus());  // it computes as the engine's first worker
    } catch (...) {
        // A thread that cannot bind still computes correctly, only maybe next to another's workers.
    }
    using clock = std::chrono::steady_clock;
    auto last   = clock::now();
    while (!stop_.load(std::memory_order_relaxed)) {
        const uint32_t id = __atomic_load_n(request_, __ATOMIC_ACQUIRE);
        if (id == 0) {
            const auto idle = clock::now() - last;
            if (idle < kSpin) {
                cpu_relax();
            } else {
                std::this_thread::sleep_for(idle < kShortNaps ? kShortNap : kLongNap);
            }
            continue;
        }
        // The stream writes the next request only after it has seen `done`, which comes after this.
        __atomic_store_n(request_, 0u, __ATOMIC_RELAXED);
        Job job = job_for(id);
        run(&job);
        __atomic_store_n(done_, id, __ATOMIC_RELEASE);
        last = clock::now();
    }
}

void CudaBridge::enqueue(uintptr_t stream, int layer, int64_t n_tokens, bool counted) {
    check();
    if (n_tokens < 1 || n_tokens > x_.rows) {
        fail(ErrorKind::Value, "n_tokens=" + std::to_string(n_tokens) + " but the pinned buffers hold 1.." +
                                   std::to_string(x_.rows) + " rows");
    }
    if (counted && !real_rows_) {
        fail(ErrorKind::Value, "a counted job needs the bridge's real_rows word; this bridge has none");
    }
    Job *         job;
    const int64_t key = ((int64_t) layer * (x_.rows + 1) + n_tokens) * 2 + counted;
    if (layer < 0 || key + 1 > (int64_t) std::numeric_limits<uint32_t>::max()) {
        fail(ErrorKind::Value, "layer " + std::to_string(layer) + " is out of the bridge's range");
    }
    const uint32_t id = (uint32_t) (key + 1);  // the job's number, as job_for reads it
    {
        std::lock_guard<std::mutex> lock(jobs_mutex_);
        auto it = jobs_.find(key);
        if (it == jobs_.end()) {
            const Job j = job_for(id);
            engine_.validate(layer, j.x, j.ids, j.weights, j.out);
            it = jobs_.emplace(key, j).first;
        }
        job = &it->second;
    }
    const CudaDriver & cu = driver();
    if (!flags()) {
        check_cuda(cu.launch_host_func((CUstream) stream, &CudaBridge::run, job), "cuLaunchHostFunc");
        return;
    }
    // Ask the polling thread for job `id`, wait for its answer, and clear the answer for the next job.
    check_cuda(cu.write_value32((CUstream) stream, request_dev_, id, 0), "cuStreamWriteValue32");
    check_cuda(cu.wait_value32((CUstream) stream, done_dev_, id, CU_STREAM_WAIT_VALUE_EQ), "cuStreamWaitValue32");
    check_cuda(cu.write_value32((CUstream) stream, done_dev_, 0, 0), "cuStreamWriteValue32");
}

void CudaBridge::run(void * p) {
    Job &   job  = *static_cast<Job *>(p);
    int64_t rows = job.x.rows;
    if (job.counted) {  // the stream copied the count before it asked for the job
        const int32_t real = __atomic_load_n(job.bridge->real_rows_, __ATOMIC_ACQUIRE);
        if (real >= 0 && real < rows) {
            const size_t row_bytes = ggml_row_size(job.out.type, job.out.cols);
            std::memset((char *) job.out.data + real * row_bytes, 0, (size_t) (rows - real) * row_bytes);
            rows = real;
        }
    }
    if (rows == 0) {
        return;
    }
    try {
        job.bridge->engine_.forward(job.layer, first_rows(job.x, rows), first_rows(job.ids, rows),
                                    first_rows(job.weights, rows), first_rows(job.out, rows));
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
        fail(ErrorKind::Runtime, "the CPU experts failed in a job of the CUDA bridge (that layer's output is NaN): " + error);
    }
}

}  // namespace lvgg
