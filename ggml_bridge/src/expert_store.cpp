#include "expert_store.h"

#include "errors.h"

#include <ggml-cpu.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <regex>

namespace lvgg {

std::vector<ggml_tensor *> ExpertLayer::tensors() const {
    std::vector<ggml_tensor *> out;
    for (ggml_tensor * t : { gate, up, gate_up, down }) {
        if (t) {
            out.push_back(t);
        }
    }
    return out;
}

static std::string shape_str(const int64_t * ne, int n) {
    std::string s = "[";
    for (int i = 0; i < n; ++i) {
        s += (i ? ", " : "") + std::to_string(ne[i]);
    }
    return s + "]";
}

static ggml_backend_dev_t cpu_device() {
    return ggml_backend_reg_dev_get(ggml_backend_cpu_reg(), 0);
}

// ggml's repack buffer type for the CPU, when this build has one.
static ggml_backend_buffer_type_t repack_buffer_type() {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) {
        return nullptr;
    }
    for (ggml_backend_buffer_type_t * b = get_extra(cpu_device()); b && *b; ++b) {
        if (std::strstr(ggml_backend_buft_name(*b), "REPACK")) {
            return *b;
        }
    }
    return nullptr;
}

bool cpu_supports_experts_of_type(ggml_type type, const int64_t ne[3], ggml_backend_buffer_type_t buft) {
    ggml_init_params params = { ggml_tensor_overhead() * 8, nullptr, true };
    ggml_context *   ctx    = ggml_init(params);
    ggml_tensor *    w      = ggml_new_tensor_3d(ctx, type, ne[0], ne[1], ne[2]);
    ggml_tensor *    x      = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, ne[0], 1, 1);
    ggml_tensor *    ids    = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, 1);
    ggml_tensor *    op     = ggml_mul_mat_id(ctx, w, x, ids);
    ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(buft, 0);
    w->buffer                   = dummy;
    const bool ok               = ggml_backend_dev_supports_op(cpu_device(), op);
    ggml_backend_buffer_free(dummy);
    ggml_free(ctx);
    return ok;
}

ExpertStore::ExpertStore(const std::string & path, bool repack, bool keep_mapped) :
    path_(path),
    keep_mapped_(keep_mapped || !repack) {
    try {
        open_and_validate();
        collect_layers();
        place_weights(repack);
    } catch (...) {
        release();
        throw;
    }
}

ExpertStore::~ExpertStore() { release(); }

void ExpertStore::release() {
    for (ggml_backend_buffer_t b : repack_bufs_) {
        ggml_backend_buffer_free(b);
    }
    repack_bufs_.clear();
    repacked_.clear();
    if (repacked_ctx_) {
        ggml_free(repacked_ctx_);
        repacked_ctx_ = nullptr;
    }
    if (map_buf_) {
        ggml_backend_buffer_free(map_buf_);
        map_buf_ = nullptr;
    }
    if (map_) {
        munmap(map_, file_size_);
        map_ = nullptr;
    }
    if (meta_) {
        ggml_free(meta_);
        meta_ = nullptr;
    }
    if (gguf_) {
        gguf_free(gguf_);
        gguf_ = nullptr;
    }
}

const ExpertLayer & ExpertStore::layer(int index) const {
    auto it = layers_.find(index);
    if (it == layers_.end()) {
        std::string have;
        for (const auto & kv : layers_) {
            have += (have.empty() ? "" : ",") + std::to_string(kv.first);
        }
        fail(ErrorKind::Index, "layer " + std::to_string(index) + " has no routed experts in " + path_ +
                                   " (MoE layers in the file: " + (have.empty() ? "none" : have) + ")");
    }
    return it->second;
}

ggml_tensor * ExpertStore::repacked(const ggml_tensor * t) const {
    auto it = repacked_.find(t);
    return it == repacked_.end() ? nullptr : it->second;
}

int64_t ExpertStore::n_tensors() const { return gguf_get_n_tensors(gguf_); }

void ExpertStore::open_and_validate() {
    struct stat st;
    if (stat(path_.c_str(), &st) != 0) {
        fail(ErrorKind::File, "cannot open " + path_ + ": " + std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        fail(ErrorKind::File, path_ + " is not a regular file");
    }
    file_size_ = (size_t) st.st_size;

    char  magic[4] = {};
    FILE * f       = std::fopen(path_.c_str(), "rb");
    if (!f) {
        fail(ErrorKind::File, "cannot open " + path_ + ": " + std::strerror(errno));
    }
    const size_t got = std::fread(magic, 1, 4, f);
    std::fclose(f);
    if (got < 4 || std::memcmp(magic, "GGUF", 4) != 0) {
        fail(ErrorKind::Value, path_ + " is not a GGUF file: expected the magic 'GGUF' in its first 4 bytes, found " +
                                   (got < 4 ? std::string("only ") + std::to_string(got) + " bytes"
                                            : "'" + std::string(magic, 4) + "'") +
                                   "; convert the model with `lvgg convert` or pass a llama.cpp GGUF");
    }

    ggml_clear_recent_log();
    gguf_init_params params = { /*no_alloc=*/true, /*ctx=*/&meta_ };
    gguf_                   = gguf_init_from_file(path_.c_str(), params);
    if (!gguf_) {
        std::string why = ggml_recent_log();
        fail(ErrorKind::Value, path_ + " is a corrupt or truncated GGUF file" + (why.empty() ? "" : ": " + why));
    }

    const int64_t kv_arch = gguf_find_key(gguf_, "general.architecture");
    if (kv_arch >= 0 && gguf_get_kv_type(gguf_, kv_arch) == GGUF_TYPE_STRING) {
        architecture_ = gguf_get_val_str(gguf_, kv_arch);
    }

    // Every tensor's bytes must lie inside the file: gguf only checks the header.
    const size_t data_offset = gguf_get_data_offset(gguf_);
    for (int64_t i = 0; i < gguf_get_n_tensors(gguf_); ++i) {
        const size_t off  = gguf_get_tensor_offset(gguf_, i);
        const size_t size = gguf_get_tensor_size(gguf_, i);
        if (data_offset > file_size_ || off > file_size_ - data_offset ||
            size > file_size_ - data_offset - off) {
            fail(ErrorKind::Value, path_ + " is truncated: tensor '" + gguf_get_tensor_name(gguf_, i) +
                                       "' needs bytes up to " + std::to_string(data_offset + off + size) +
                                       " but the file has " + std::to_string(file_size_) +
                                       " bytes; the download or conversion did not finish");
        }
    }
}

void ExpertStore::collect_layers() {
    static const std::regex pat(R"(blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight)");
    for (ggml_tensor * t = ggml_get_first_tensor(meta_); t; t = ggml_get_next_tensor(meta_, t)) {
        std::cmatch m;
        if (!std::regex_match(t->name, m, pat)) {
            continue;
        }
        if (m[1].length() > 6) {
            fail(ErrorKind::Value, std::string("tensor '") + t->name + "' has an absurd layer number");
        }
        const int     index = std::stoi(m[1].str());
        ExpertLayer & L     = layers_[index];
        L.index             = index;
        const std::string proj = m[2].str();
        ggml_tensor *&    slot = proj == "gate" ? L.gate : proj == "up" ? L.up : proj == "down" ? L.down : L.gate_up;
        slot                   = t;
    }

    for (auto & kv : layers_) {
        ExpertLayer &     L   = kv.second;
        const std::string blk = "blk." + std::to_string(L.index) + ".";
        if (!L.down) {
            fail(ErrorKind::Value, path_ + ": layer " + std::to_string(L.index) + " has expert tensors but no '" + blk +
                                       "ffn_down_exps.weight'");
        }
        if (!L.up && !L.gate_up) {
            fail(ErrorKind::Value, path_ + ": layer " + std::to_string(L.index) + " has no '" + blk +
                                       "ffn_up_exps.weight' (nor a fused '" + blk + "ffn_gate_up_exps.weight')");
        }
        if (L.gate_up && (L.gate || L.up)) {
            fail(ErrorKind::Value, path_ + ": layer " + std::to_string(L.index) +
                                       " has both a fused ffn_gate_up_exps and separate gate/up expert tensors");
        }
        if (ggml_n_dims(L.down) != 3) {
            fail(ErrorKind::Value, std::string("tensor '") + L.down->name + "' should be 3-D [F, D, experts], found " +
                                       shape_str(L.down->ne, 4));
        }
        L.n_ff     = L.down->ne[0];
        L.n_embd   = L.down->ne[1];
        L.n_expert = L.down->ne[2];
        auto expect = [&](ggml_tensor * t, int64_t rows) {
            const int64_t want[4] = { L.n_embd, rows, L.n_expert, 1 };
            if (t && std::memcmp(t->ne, want, sizeof(want)) != 0) {
                fail(ErrorKind::Value, std::string("tensor '") + t->name + "' has shape " + shape_str(t->ne, 4) +
                                           ", expected " + shape_str(want, 4) + " to match '" + L.down->name +
                                           "' " + shape_str(L.down->ne, 3) + " (ggml order: [in, out, experts])");
            }
        };
        expect(L.gate, L.n_ff);
        expect(L.up, L.n_ff);
        expect(L.gate_up, 2 * L.n_ff);
    }
}

void ExpertStore::place_weights(bool repack) {
    if (layers_.empty()) {
        return;
    }
    const int fd = open(path_.c_str(), O_RDONLY);
    if (fd < 0) {
        fail(ErrorKind::File, "cannot open " + path_ + ": " + std::strerror(errno));
    }
    map_ = mmap(nullptr, file_size_, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (map_ == MAP_FAILED) {
        map_ = nullptr;
        fail(ErrorKind::File, "cannot memory-map " + path_ + ": " + std::strerror(errno));
    }
    map_buf_ = ggml_backend_cpu_buffer_from_ptr(map_, file_size_);

    ggml_backend_buffer_type_t cpu_buft    = ggml_backend_cpu_buffer_type();
    ggml_backend_buffer_type_t repack_buft = repack ? repack_buffer_type() : nullptr;
    const size_t               data_offset = gguf_get_data_offset(gguf_);
    size_t                     n_expert_tensors = 0;
    for (const auto & kv : layers_) {
        n_expert_tensors += kv.second.tensors().size();
    }
    repacked_ctx_ = ggml_init({ ggml_tensor_overhead() * n_expert_tensors, nullptr, /*no_alloc=*/true });
    for (auto & kv : layers_) {
        for (ggml_tensor * t : kv.second.tensors()) {
            if (!cpu_supports_experts_of_type(t->type, t->ne, cpu_buft)) {
                fail(ErrorKind::Value, std::string("tensor '") + t->name + "' has type " + ggml_type_name(t->type) +
                                           ", which ggml's CPU backend cannot multiply; requantize the experts "
                                           "(lvgg convert --type Q4_K)");
            }
            char * src = (char *) map_ + data_offset + gguf_get_tensor_offset(gguf_, gguf_find_tensor(gguf_, t->name));
            ggml_backend_tensor_alloc(map_buf_, t, src);
            if (repack_buft && cpu_supports_experts_of_type(t->type, t->ne, repack_buft)) {
                ggml_tensor *         twin = ggml_dup_tensor(repacked_ctx_, t);
                ggml_backend_buffer_t buf =
                    ggml_backend_buft_alloc_buffer(repack_buft, ggml_backend_buft_get_alloc_size(repack_buft, twin));
                if (!buf) {
                    fail(ErrorKind::Runtime, std::string("out of memory repacking '") + t->name + "'");
                }
                repack_bufs_.push_back(buf);
                ggml_set_name(twin, t->name);
                ggml_backend_tensor_alloc(buf, twin, ggml_backend_buffer_get_base(buf));
                ggml_backend_tensor_set(twin, src, 0, ggml_nbytes(t));
                repacked_[t] = twin;
                if (!keep_mapped_) {
                    // Only the repacked copy will run: let the kernel drop our mapping of the source.
                    const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
                    const uintptr_t lo   = ((uintptr_t) src + page - 1) & ~(page - 1);
                    const uintptr_t hi   = ((uintptr_t) src + ggml_nbytes(t)) & ~(page - 1);
                    if (hi > lo) {
                        madvise((void *) lo, hi - lo, MADV_DONTNEED);
                    }
                }
            }
        }
    }
}

}  // namespace lvgg
