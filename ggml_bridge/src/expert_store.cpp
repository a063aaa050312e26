#include "expert_store.h"

#include "errors.h"
#include "threads.h"
#include "vnni_kquants.h"

#include <ggml-cpu.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <regex>

namespace lvgg {

std::atomic<uint64_t> PlacementProgress::done{ 0 };
std::atomic<uint64_t> PlacementProgress::total{ 0 };

#ifndef MADV_POPULATE_READ
#    define MADV_POPULATE_READ 22  // Linux 5.14
#endif

void read_in(uintptr_t address, size_t size) {
    const uintptr_t page  = (uintptr_t) sysconf(_SC_PAGESIZE);
    const uintptr_t begin = address & ~(page - 1), end = address + size;
    if (!address || size == 0 || end < address) {
        fail(ErrorKind::Value, "read_in: expected a non-null address and a size above 0, found " + std::to_string(size) +
                                   " bytes at " + std::to_string(address));
    }
    // MADV_WILLNEED fails with ENOMEM where a page of the range is not mapped: checked before
    // anything is touched.
    if (madvise(reinterpret_cast<void *>(begin), end - begin, MADV_WILLNEED) != 0) {
        fail(ErrorKind::Value, "read_in: " + std::to_string(size) + " bytes at " + std::to_string(address) +
                                   " are not all mapped (" + std::strerror(errno) + ")");
    }
    constexpr uintptr_t chunk = 256ull << 20;
    PlacementProgress::total += end - begin;
    for (uintptr_t at = begin; at < end; at += chunk) {
        const uintptr_t n = std::min(chunk, end - at);
        if (madvise(reinterpret_cast<void *>(at), n, MADV_POPULATE_READ) != 0) {
            if (errno != EINVAL) {  // e.g. EFAULT: the file could not be read
                fail(ErrorKind::File, "read_in: reading " + std::to_string(n) + " bytes at " + std::to_string(at) +
                                          " into memory failed (" + std::strerror(errno) + ")");
            }
            for (uintptr_t p = at; p < at + n; p += page) {  // a kernel before 5.14: touch each page
                (void) *reinterpret_cast<const volatile uint8_t *>(p);
            }
        }
        PlacementProgress::done += n;
    }
}

static uint64_t layer_bytes(const ExpertLayer & L) {
    uint64_t n = 0;
    for (const ggml_tensor * t : L.tensors()) {
        n += ggml_nbytes(t);
    }
    return n;
}

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

ExpertStore::ExpertStore(const std::vector<std::string> & paths, bool repack, bool keep_mapped,
                         const std::vector<int> & only_layers, bool own_kernels) :
    path_(paths.empty() ? std::string() : paths[0]),
    keep_mapped_(keep_mapped || !repack),
    own_kernels_(own_kernels) {
    if (paths.empty()) {
        fail(ErrorKind::Value, "an expert store needs a GGUF file (or the parts of a split one), none given");
    }
    try {
        open_and_validate(paths);
        collect_layers();
        if (!only_layers.empty()) {
            keep_only(only_layers);
        }
        place_weights(repack, only_layers.empty());
    } catch (...) {
        release();
        throw;
    }
}

ExpertStore::Headers ExpertStore::check_files(const std::vector<std::string> & paths) {
    if (paths.empty()) {
        fail(ErrorKind::Value, "no GGUF file given");
    }
    ExpertStore headers;
    headers.path_ = paths[0];
    headers.open_and_validate(paths);
    headers.collect_layers();
    Headers out;
    for (const auto & kv : headers.layers_) {
        for (const ggml_tensor * t : kv.second.tensors()) {
            headers.check_cpu_type(t);
        }
        out.layers[kv.first] = { kv.second.routed_experts, kv.second.n_embd, kv.second.n_ff,
                                 (int64_t) headers.file_biases_.count(kv.first) };
    }
    for (const char * key : { "general.architecture", "lvgg.architecture" }) {
        const int64_t i = gguf_find_key(headers.gguf(), key);
        if (i >= 0 && gguf_get_kv_type(headers.gguf(), i) == GGUF_TYPE_STRING) {
            out.architecture[key] = gguf_get_val_str(headers.gguf(), i);
        }
    }
    return out;
}

ExpertStore::ExpertStore(const ExpertStore & whole, int part, int n_parts, bool repack, Split by) :
    path_(whole.path_ + (by == Split::Experts ? " (experts part " : " (part ") + std::to_string(part + 1) + " of " +
          std::to_string(n_parts) + ")"),
    architecture_(whole.architecture_),
    keep_mapped_(!repack),
    own_kernels_(whole.own_kernels_) {
    try {
        slice_from(whole, part, n_parts, repack, by);
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
    for (ggml_backend_buffer_t b : slice_bufs_) {
        ggml_backend_buffer_free(b);
    }
    slice_bufs_.clear();
    repacked_.clear();
    packed_.clear();
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
    for (Shard & f : shards_) {
        if (f.meta) {
            ggml_free(f.meta);
        }
        if (f.gguf) {
            gguf_free(f.gguf);
        }
    }
    shards_.clear();
    file_at_.clear();
    file_biases_.clear();
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

bool ExpertStore::packed(const ggml_tensor * twin) const { return packed_.count(twin) != 0; }

static size_t count_expert_tensors(const std::map<int, ExpertLayer> & layers) {
    size_t n = 0;
    for (const auto & kv : layers) {
        n += kv.second.tensors().size();
    }
    return n;
}

// `bytes` quoted for a message: printable ASCII as it is, anything else as \xNN.
static std::string printable(const std::string & bytes) {
    std::string out = "'";
    for (const unsigned char c : bytes) {
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            out += (char) c;
        } else {
            static const char hex[] = "0123456789abcdef";
            out += std::string("\\x") + hex[c >> 4] + hex[c & 15];
        }
    }
    return out + "'";
}

// A metadata-only context for `n` tensors.
static ggml_context * tensor_context(size_t n) {
    return ggml_init({ ggml_tensor_overhead() * n, nullptr, /*no_alloc=*/true });
}

int64_t ExpertStore::n_tensors() const {
    if (shards_.empty()) {
        return (int64_t) count_expert_tensors(layers_);
    }
    int64_t n = 0;
    for (const Shard & f : shards_) {
        n += gguf_get_n_tensors(f.gguf);
    }
    return n;
}

static size_t page_size() { return (size_t) sysconf(_SC_PAGESIZE); }

static size_t round_to_pages(size_t n) { return (n + page_size() - 1) / page_size() * page_size(); }

void ExpertStore::open_and_validate(const std::vector<std::string> & paths) {
    for (const std::string & path : paths) {
        struct stat st;
        if (stat(path.c_str(), &st) != 0) {
            fail(ErrorKind::File, "cannot open " + path + ": " + std::strerror(errno));
        }
        if (!S_ISREG(st.st_mode)) {
            fail(ErrorKind::File, path + " is not a regular file");
        }
        char   magic[4] = {};
        FILE * fp       = std::fopen(path.c_str(), "rb");
        if (!fp) {
            fail(ErrorKind::File, "cannot open " + path + ": " + std::strerror(errno));
        }
        const size_t got = std::fread(magic, 1, 4, fp);
        std::fclose(fp);
        if (got < 4 || std::memcmp(magic, "GGUF", 4) != 0) {
            fail(ErrorKind::Value, path + " is not a GGUF file: expected the magic 'GGUF' in its first 4 bytes, "
                                       "found " + (got < 4 ? std::string("only ") + std::to_string(got) + " bytes"
                                                : printable(std::string(magic, 4))) +
                                       "; convert the model with `lvgg convert` or pass a llama.cpp GGUF");
        }
        Shard & f = shards_.emplace_back();
        f.path    = path;
        f.size    = (size_t) st.st_size;
        if (shards_.size() > 1) {  // from the page after the previous part's
            f.base = shards_[shards_.size() - 2].base + round_to_pages(shards_[shards_.size() - 2].size);
        }

        ggml_clear_recent_log();
        gguf_init_params params = { /*no_alloc=*/true, /*ctx=*/&f.meta };
        f.gguf                  = gguf_init_from_file(path.c_str(), params);
        if (!f.gguf) {
            std::string why = ggml_recent_log();
            fail(ErrorKind::Value, path + " is a corrupt or truncated GGUF file" + (why.empty() ? "" : ": " + why));
        }
        // Every tensor's bytes must lie inside the file: gguf only checks the header.
        const size_t data_offset = gguf_get_data_offset(f.gguf);
        for (int64_t i = 0; i < gguf_get_n_tensors(f.gguf); ++i) {
            const size_t off  = gguf_get_tensor_offset(f.gguf, i);
            const size_t size = gguf_get_tensor_size(f.gguf, i);
            if (data_offset > f.size || off > f.size - data_offset || size > f.size - data_offset - off) {
                fail(ErrorKind::Value, path + " is truncated: tensor '" + gguf_get_tensor_name(f.gguf, i) +
                                           "' needs bytes up to " + std::to_string(data_offset + off + size) +
                                           " but the file has " + std::to_string(f.size) +
                                           " bytes; the download or conversion did not finish");
            }
        }
    }
    file_size_ = shards_.back().base + shards_.back().size;

    const int64_t kv_arch = gguf_find_key(shards_[0].gguf, "general.architecture");
    if (kv_arch >= 0 && gguf_get_kv_type(shards_[0].gguf, kv_arch) == GGUF_TYPE_STRING) {
        architecture_ = gguf_get_val_str(shards_[0].gguf, kv_arch);
    }
    check_split_set();
}

// An integer key of a header (any integer type), or `otherwise` where it is absent or not an integer.
static int64_t int_key(const gguf_context * g, const char * key, int64_t otherwise) {
    const int64_t i = gguf_find_key(g, key);
    if (i < 0) {
        return otherwise;
    }
    switch (gguf_get_kv_type(g, i)) {
        case GGUF_TYPE_UINT8: return gguf_get_val_u8(g, i);
        case GGUF_TYPE_INT8: return gguf_get_val_i8(g, i);
        case GGUF_TYPE_UINT16: return gguf_get_val_u16(g, i);
        case GGUF_TYPE_INT16: return gguf_get_val_i16(g, i);
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, i);
        case GGUF_TYPE_INT32: return gguf_get_val_i32(g, i);
        case GGUF_TYPE_UINT64: return (int64_t) gguf_get_val_u64(g, i);
        case GGUF_TYPE_INT64: return gguf_get_val_i64(g, i);
        default: return otherwise;
    }
}

// The files are one split GGUF's parts, in order, all of them, each once (llama.cpp's split.no,
// split.count and split.tensors.count keys), or one file that is not split.
void ExpertStore::check_split_set() const {
    const int64_t count = int_key(shards_[0].gguf, "split.count", 1);
    if (count != (int64_t) shards_.size()) {
        fail(ErrorKind::Value, shards_[0].path + " says it is one of " + std::to_string(count) +
                                   " parts of a split GGUF, " + std::to_string(shards_.size()) +
                                   " given; name its first part (-00001-of-...gguf) with every part beside it");
    }
    std::map<std::string, std::string> seen;  // tensor name -> its file
    int64_t                            tensors = 0;
    for (size_t i = 0; i < shards_.size(); ++i) {
        const Shard & f  = shards_[i];
        const int64_t no = int_key(f.gguf, "split.no", 0);
        if (no != (int64_t) i || int_key(f.gguf, "split.count", 1) != count) {
            fail(ErrorKind::Value, f.path + " should be part " + std::to_string(i + 1) + " of " +
                                       std::to_string(count) + ", its header says part " + std::to_string(no + 1) + " of " +
                                       std::to_string(int_key(f.gguf, "split.count", 1)) +
                                       ": a part is duplicated, renamed or from another download");
        }
        for (int64_t t = 0; t < gguf_get_n_tensors(f.gguf); ++t, ++tensors) {
            const std::string name = gguf_get_tensor_name(f.gguf, t);
            const auto [at, fresh] = seen.emplace(name, f.path);
            if (!fresh) {
                fail(ErrorKind::Value, "tensor '" + name + "' is in both " + at->second + " and " + f.path +
                                           ": the parts are from different files");
            }
        }
    }
    const int64_t want = int_key(shards_[0].gguf, "split.tensors.count", tensors);
    if (count > 1 && want != tensors) {
        fail(ErrorKind::Value, "the " + std::to_string(count) + " parts of " + shards_[0].path + " hold " +
                                   std::to_string(tensors) + " tensors, its first part says " + std::to_string(want) +
                                   ": a part is from another model or download");
    }
}

void ExpertStore::collect_layers() {
    static const std::regex pat(R"(blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias))");
    for (const Shard & f : shards_) {
        for (ggml_tensor * t = ggml_get_first_tensor(f.meta); t; t = ggml_get_next_tensor(f.meta, t)) {
            std::cmatch m;
            if (!std::regex_match(t->name, m, pat)) {
                continue;
            }
            file_at_[t] = f.base + gguf_get_data_offset(f.gguf) +
                          gguf_get_tensor_offset(f.gguf, gguf_find_tensor(f.gguf, t->name));
            if (m[1].length() > 6) {
                fail(ErrorKind::Value, std::string("tensor '") + t->name + "' has an absurd layer number");
            }
            const int     index = std::stoi(m[1].str());
            const std::string proj = m[2].str();
            if (m[3].str() == "bias") {
                file_biases_[index][proj] = t;
                continue;
            }
            ExpertLayer & L     = layers_[index];
            L.index             = index;
            ggml_tensor *&    slot = proj == "gate" ? L.gate : proj == "up" ? L.up : proj == "down" ? L.down
                                                                                                : L.gate_up;
            slot                   = t;
        }
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
        L.routed_experts = L.n_expert;
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
        check_biases(L);
    }
    for (const auto & kv : file_biases_) {
        if (!layers_.count(kv.first)) {
            fail(ErrorKind::Value, path_ + ": '" + kv.second.begin()->second->name + "' is a bias of layer " +
                                       std::to_string(kv.first) + ", which has no expert weights");
        }
    }
}

// A layer's biases are all there or all absent: gate and up (a gated layer's; up alone an ungated
// one's) and down, f32, one row per expert.
void ExpertStore::check_biases(const ExpertLayer & L) const {
    auto it = file_biases_.find(L.index);
    if (it == file_biases_.end()) {
        return;
    }
    const std::string blk = "blk." + std::to_string(L.index) + ".ffn_";
    if (it->second.count("gate_up")) {
        fail(ErrorKind::Value, path_ + ": '" + blk + "gate_up_exps.bias' is not a bias lvgg reads: it takes '" + blk +
                                   "gate_exps.bias' and '" + blk + "up_exps.bias' (llama.cpp's names)");
    }
    for (const char * proj : { "gate", "up", "down" }) {
        if (std::string(proj) == "gate" && !L.gated()) {
            continue;
        }
        const auto b = it->second.find(proj);
        if (b == it->second.end()) {
            fail(ErrorKind::Value, path_ + ": layer " + std::to_string(L.index) + " has expert biases but no '" + blk +
                                       proj + "_exps.bias'; a file's experts have every bias or none");
        }
        const int64_t want[4] = { std::string(proj) == "down" ? L.n_embd : L.n_ff, L.n_expert, 1, 1 };
        if (b->second->type != GGML_TYPE_F32 || std::memcmp(b->second->ne, want, sizeof(want)) != 0) {
            fail(ErrorKind::Value, std::string("tensor '") + b->second->name + "' is " + ggml_type_name(b->second->type) +
                                       " " + shape_str(b->second->ne, 4) + ", expected f32 " + shape_str(want, 4) +
                                       " (one row per expert)");
        }
    }
    if (!L.gated() && it->second.count("gate")) {
        fail(ErrorKind::Value, path_ + ": '" + blk + "gate_exps.bias' belongs to no gate tensor");
    }
}

void ExpertStore::keep_only(const std::vector<int> & layers) {
    std::map<int, ExpertLayer> kept;
    for (int index : layers) {
        auto it = layers_.find(index);
        if (it == layers_.end()) {
            std::string have;
            for (const auto & kv : layers_) {
                have += (have.empty() ? "" : ",") + std::to_string(kv.first);
            }
            fail(ErrorKind::Value, path_ + " has no experts for layer " + std::to_string(index) + " (its MoE layers: " +
                                       have + ")");
        }
        kept.insert(*it);
    }
    layers_.swap(kept);
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14
#endif

void ExpertStore::check_cpu_type(const ggml_tensor * t) const {
    if (!cpu_supports_experts_of_type(t->type, t->ne, ggml_backend_cpu_buffer_type())) {
        fail(ErrorKind::Value, std::string("tensor '") + t->name + "' of " + path_ + " has type " +
                                   ggml_type_name(t->type) + ", which ggml's CPU backend cannot multiply; "
                                   "requantize the experts (lvgg convert --type Q4_K)");
    }
}

// Maps every file end to end, each from a page boundary: one range the GPU can pin and read.
void ExpertStore::map_files() {
    void * span = mmap(nullptr, file_size_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (span == MAP_FAILED) {
        fail(ErrorKind::File, "cannot reserve " + std::to_string(file_size_ >> 20) + " MiB of address space for " +
                                  path_ + ": " + std::strerror(errno));
    }
    map_ = span;
    for (const Shard & f : shards_) {
        const int fd = open(f.path.c_str(), O_RDONLY);
        if (fd < 0) {
            fail(ErrorKind::File, "cannot open " + f.path + ": " + std::strerror(errno));
        }
        void * at = mmap((char *) map_ + f.base, f.size, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
        close(fd);
        if (at == MAP_FAILED) {
            fail(ErrorKind::File, "cannot memory-map " + f.path + ": " + std::strerror(errno));
        }
    }
}

// populate: read every expert tensor in at once (every layer is used); otherwise pages fault in
// as the kept layers are read. The files' other tensors (a llama.cpp GGUF's attention,
// embeddings, ...) are never read.
void ExpertStore::place_weights(bool repack, bool populate) {
    if (layers_.empty()) {
        return;
    }
    map_files();
    map_buf_ = ggml_backend_cpu_buffer_from_ptr(map_, file_size_);

    repack_                             = repack;
    repacked_ctx_                       = tensor_context(count_expert_tensors(layers_) + 2 * layers_.size());
    for (const auto & kv : layers_) {
        PlacementProgress::total += layer_bytes(kv.second);
    }
    std::vector<char> staging;  // a layer's gate and up rows, interleaved per expert, for the fused copy
    for (auto & kv : layers_) {
        ExpertLayer & L = kv.second;
        for (ggml_tensor * t : L.tensors()) {
            check_cpu_type(t);
            char * src = (char *) map_ + file_at_.at(t);
            ggml_backend_tensor_alloc(map_buf_, t, src);
            if (populate) {
                const uintptr_t lo = (uintptr_t) src & ~(uintptr_t) (page_size() - 1);
                const size_t    n  = round_to_pages((uintptr_t) src + ggml_nbytes(t) - lo);
                if (madvise((void *) lo, n, MADV_POPULATE_READ) != 0) {  // older kernels: a hint
                    madvise((void *) lo, n, MADV_WILLNEED);
                }
            }
        }
        place_biases(L);
        const bool fused = add_fused_gate_up(L, staging);
        for (ggml_tensor * t : L.tensors()) {
            const bool in_fused = fused && (t == L.gate || t == L.up);
            if ((in_fused || add_repacked(t, t->data)) && !keep_mapped_) {
                // Only the repacked copy will run: let the kernel drop our mapping of the source.
                const uintptr_t page = page_size();
                const uintptr_t lo   = ((uintptr_t) t->data + page - 1) & ~(page - 1);
                const uintptr_t hi   = ((uintptr_t) t->data + ggml_nbytes(t)) & ~(page - 1);
                if (hi > lo) {
                    madvise((void *) lo, hi - lo, MADV_DONTNEED);
                }
            }
        }
        PlacementProgress::done += layer_bytes(L);
    }
}

ggml_tensor * ExpertStore::new_bias(int64_t rows, int64_t experts, const std::string & name) {
    ggml_tensor * t = ggml_new_tensor_2d(repacked_ctx_, GGML_TYPE_F32, rows, experts);
    ggml_set_name(t, name.c_str());
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(ggml_backend_cpu_buffer_type(), ggml_nbytes(t));
    if (!buf) {
        fail(ErrorKind::Runtime, "out of memory for '" + name + "'");
    }
    slice_bufs_.push_back(buf);
    ggml_backend_tensor_alloc(buf, t, ggml_backend_buffer_get_base(buf));
    std::memset(t->data, 0, ggml_nbytes(t));
    return t;
}

// The file's gate and up biases of a layer as one in_bias (each expert's gate row, then its up row,
// like a fused gate_up's output), its down bias as out_bias.
void ExpertStore::place_biases(ExpertLayer & L) {
    auto it = file_biases_.find(L.index);
    if (it == file_biases_.end()) {
        return;
    }
    const std::string blk = "blk." + std::to_string(L.index) + ".";
    // expert e's row of the file's bias of `proj`, `width` values long (check_biases checked the shape)
    auto row = [&](const char * proj, int64_t e, int64_t width) {
        return (const float *) ((const char *) map_ + file_at_.at(it->second.at(proj))) + e * width;
    };
    L.in_bias  = new_bias(L.in_rows(), L.n_expert, blk + "ffn_gate_up_exps.bias");
    L.out_bias = new_bias(L.n_embd, L.n_expert, blk + "ffn_down_exps.bias");
    for (int64_t e = 0; e < L.n_expert; ++e) {
        float * in = (float *) L.in_bias->data + e * L.in_rows();
        if (L.gated()) {
            std::memcpy(in, row("gate", e, L.n_ff), L.n_ff * sizeof(float));
        }
        std::memcpy(in + (L.gated() ? L.n_ff : 0), row("up", e, L.n_ff), L.n_ff * sizeof(float));
        std::memcpy((float *) L.out_bias->data + e * L.n_embd, row("down", e, L.n_embd), L.n_embd * sizeof(float));
    }
}

// Rows [first, first + n) of experts [e0, e0 + n_experts) of `from` into `to` (experts `to_stride`
// bytes apart).
static void copy_expert_rows(char * to, size_t to_stride, const ggml_tensor * from, int64_t e0, int64_t n_experts,
                             int64_t first, int64_t n) {
    for (int64_t e = 0; e < n_experts; ++e) {
        std::memcpy(to + e * to_stride, (const char *) from->data + (e0 + e) * from->nb[2] + first * from->nb[1],
                    n * from->nb[1]);
    }
}

bool ExpertStore::add_fused_gate_up(const ExpertLayer & L, std::vector<char> & staging) {
    if (!repack_ || !L.gate || !L.up || L.gate->type != L.up->type) {
        return false;
    }
    const int64_t ne[3] = { L.n_embd, 2 * L.n_ff, L.n_expert };
    const std::string name = "blk." + std::to_string(L.index) + ".ffn_gate_up_exps.weight";
    if (own_kernels_ && vnni::packable(L.gate->type, L.n_ff, L.n_embd)) {  // gate rows, then up rows of each expert
        ggml_tensor * twin   = new_packed_twin(L.gate->type, ne, name);
        const size_t  stride = vnni::packed_size(L.gate->type, ne[1], ne[0]);
        const size_t  half   = vnni::packed_size(L.gate->type, L.n_ff, L.n_embd);
        for (const ggml_tensor * t : { L.gate, L.up }) {
            vnni::pack(t->type, t->data, t->nb[2], L.n_ff, L.n_embd, L.n_expert,
                       (char *) twin->data + (t == L.up ? half : 0), stride, pack_threads());
        }
        repacked_[L.gate] = repacked_[L.up] = twin;
        return true;
    }
    ggml_backend_buffer_type_t repack_buft = repack_buffer_type();
    if (!repack_buft || !cpu_supports_experts_of_type(L.gate->type, ne, repack_buft)) {
        return false;
    }
    ggml_tensor * twin = ggml_new_tensor_3d(repacked_ctx_, L.gate->type, ne[0], ne[1], ne[2]);
    ggml_set_name(twin, name.c_str());
    ggml_backend_buffer_t buf =
        ggml_backend_buft_alloc_buffer(repack_buft, ggml_backend_buft_get_alloc_size(repack_buft, twin));
    if (!buf) {
        fail(ErrorKind::Runtime, "out of memory repacking the gate and up experts of layer " + std::to_string(L.index));
    }
    repack_bufs_.push_back(buf);
    ggml_backend_tensor_alloc(buf, twin, ggml_backend_buffer_get_base(buf));
    staging.resize(ggml_nbytes(twin));
    copy_expert_rows(staging.data(), twin->nb[2], L.gate, 0, L.n_expert, 0, L.n_ff);
    copy_expert_rows(staging.data() + L.gate->nb[2], twin->nb[2], L.up, 0, L.n_expert, 0, L.n_ff);
    ggml_backend_tensor_set(twin, staging.data(), 0, ggml_nbytes(twin));
    repacked_[L.gate] = repacked_[L.up] = twin;  // the engine sees one twin for both: one MUL_MAT_ID
    return true;
}

ggml_tensor * ExpertStore::add_repacked(ggml_tensor * t, const void * src) {
    if (!repack_) {
        return nullptr;
    }
    if (own_kernels_ && vnni::packable(t->type, t->ne[1], t->ne[0])) {
        ggml_tensor * twin = new_packed_twin(t->type, t->ne, t->name);
        vnni::pack(t->type, src, t->nb[2], t->ne[1], t->ne[0], t->ne[2], twin->data,
                   vnni::packed_size(t->type, t->ne[1], t->ne[0]), pack_threads());
        repacked_[t] = twin;
        return twin;
    }
    ggml_backend_buffer_type_t repack_buft = repack_buffer_type();
    if (!repack_buft || !cpu_supports_experts_of_type(t->type, t->ne, repack_buft)) {
        return nullptr;
    }
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
    return twin;
}

// A twin in lvgg's packed layout (vnni_kquants.h): a tensor ggml never computes with, whose
// bytes the engine's own kernels read (and a GPU: lvgg.gpu_experts); not yet written. It starts
// on a page of its own and its last page holds nothing else, so that it can be pinned for the GPU
// on its own (twin_pages).
ggml_tensor * ExpertStore::new_packed_twin(ggml_type type, const int64_t ne[3], const std::string & name) {
    const size_t          page  = twin_page();
    const size_t          bytes = vnni::packed_size(type, ne[1], ne[0]) * ne[2];
    ggml_backend_buffer_t buf   = ggml_backend_buft_alloc_buffer(ggml_backend_cpu_buffer_type(),
                                                                 (bytes + page - 1) / page * page + page);
    if (!buf) {
        fail(ErrorKind::Runtime, "out of memory packing '" + name + "' (" + std::to_string(bytes >> 20) + " MiB)");
    }
    repack_bufs_.push_back(buf);
    ggml_tensor * twin = ggml_new_tensor_3d(repacked_ctx_, type, ne[0], ne[1], ne[2]);
    ggml_set_name(twin, name.c_str());
    const uintptr_t base = ((uintptr_t) ggml_backend_buffer_get_base(buf) + page - 1) & ~uintptr_t(page - 1);
    ggml_backend_tensor_alloc(buf, twin, (void *) base);  // packed bytes >= ggml's bytes of the shape
    packed_.insert(twin);
    return twin;
}

size_t ExpertStore::twin_page() { return page_size(); }

size_t ExpertStore::twin_pages(const ggml_tensor * twin) {
    const size_t page = twin_page();
    return (vnni::packed_size(twin->type, twin->ne[1], twin->ne[0]) * twin->ne[2] + page - 1) / page * page;
}

// Packing runs on the CPUs this thread may use (a NUMA part's: its node's), one thread each.
int ExpertStore::pack_threads() { return (int) std::max<size_t>(1, process_cpus().size()); }

// The granule of a part by rows or blocks (see part_range).
static int64_t part_unit(const ExpertLayer & L, Split by) {
    const int64_t block = ggml_blck_size(L.down->type);
    const int64_t unit  = by == Split::Rows ? 32 : std::lcm(block, (int64_t) 32);
    return L.n_ff % unit == 0 ? unit : block;
}

// Share `part` of `n_parts` of `count` units, [begin, end): as evenly as they go, the first
// shares taking one more.
static std::pair<int64_t, int64_t> even_share(int64_t count, int part, int n_parts) {
    if (n_parts < 1 || part < 0 || part >= n_parts) {
        fail(ErrorKind::Value, "part " + std::to_string(part) + " of " + std::to_string(n_parts) + " does not exist");
    }
    const int64_t base = count / n_parts, extra = count % n_parts;
    const int64_t begin = part * base + std::min<int64_t>(part, extra);
    return { begin, begin + base + (part < extra ? 1 : 0) };
}

int64_t ExpertStore::max_parts(Split by) const {
    int64_t most = INT64_MAX;
    for (const auto & kv : layers_) {
        const ExpertLayer & L = kv.second;
        most = std::min(most, by == Split::Experts ? L.n_expert : L.n_ff / part_unit(L, by));
    }
    return layers_.empty() ? 0 : most;
}

std::pair<int64_t, int64_t> ExpertStore::part_range(const ExpertLayer & L, int part, int n_parts, Split by) {
    const int64_t unit  = part_unit(L, by);
    const int64_t units = L.n_ff / unit;
    const auto [begin, end] = even_share(units, part, n_parts);
    if (units < n_parts) {
        fail(ErrorKind::Value, "layer " + std::to_string(L.index) + ": its intermediate size " +
                                   std::to_string(L.n_ff) + " is " + std::to_string(units) + " units of " +
                                   std::to_string(unit) + " rows, too few to split over " + std::to_string(n_parts) +
                                   " nodes or ranks; use at most " + std::to_string(units) + " (LVGG_NUMA)");
    }
    return { begin * unit, end * unit };
}

PartShape ExpertStore::part_shape(const ExpertLayer & L, int part, int n_parts, Split by) {
    PartShape s;
    if (by == Split::Experts) {
        s.experts = even_share(L.n_expert, part, n_parts);
        if (L.n_expert < n_parts) {
            fail(ErrorKind::Value, "layer " + std::to_string(L.index) + " has " + std::to_string(L.n_expert) +
                                       " experts, too few to give each of " + std::to_string(n_parts) + " parts one");
        }
        s.rows = { 0, L.n_ff };
    } else {
        s.experts = { 0, L.n_expert };
        s.rows    = part_range(L, part, n_parts, by);
    }
    const int64_t block = ggml_blck_size(L.down->type);
    s.columns = { (s.rows.first + L.down_lead) / block * block,
                  (s.rows.second + L.down_lead + block - 1) / block * block };
    return s;
}

size_t ExpertStore::part_bytes(int part, int n_parts, Split by) const {
    size_t total = 0;
    for (const auto & kv : layers_) {
        const ExpertLayer & L = kv.second;
        const PartShape     s = part_shape(L, part, n_parts, by);
        const int64_t experts = s.experts.second - s.experts.first, rows = s.rows.second - s.rows.first;
        for (const ggml_tensor * t : L.tensors()) {
            total += experts * (t == L.down ? L.n_embd * ggml_row_size(t->type, s.columns.second - s.columns.first)
                                            : (t == L.gate_up ? 2 : 1) * rows * ggml_row_size(t->type, L.n_embd));
        }
    }
    return total;
}

void ExpertStore::slice_from(const ExpertStore & whole, int part, int n_parts, bool repack, Split by) {
    for (const auto & kv : whole.layers_) {
        for (const ggml_tensor * t : kv.second.tensors()) {
            if (!t->data) {
                fail(ErrorKind::Value, whole.path_ + " keeps only repacked copies of its experts, which cannot be "
                                                     "split; split a store opened from a file, or a part made with "
                                                     "repack=False");
            }
        }
    }
    const uint64_t planned = whole.part_bytes(part, n_parts, by);
    PlacementProgress::total += planned;
    uint64_t placed = 0;
    repack_       = repack;
    meta_         = tensor_context(count_expert_tensors(whole.layers_));
    repacked_ctx_ = tensor_context(count_expert_tensors(whole.layers_) + 2 * whole.layers_.size());
    ggml_backend_buffer_type_t cpu_buft = ggml_backend_cpu_buffer_type();
    for (const auto & kv : whole.layers_) {
        const ExpertLayer & W = kv.second;
        const PartShape     shape = part_shape(W, part, n_parts, by);
        const auto [a, b]     = shape.rows;
        const auto [c0, c1]   = shape.columns;
        const auto [e0, e1]   = shape.experts;
        ExpertLayer & L       = layers_[kv.first];
        L.index               = W.index;
        L.n_expert            = e1 - e0;
        L.first_expert        = W.first_expert + e0;
        L.routed_experts      = W.routed_experts;
        L.n_embd              = W.n_embd;
        L.n_ff                = b - a;
        L.down_lead           = a + W.down_lead - c0;
        if (W.in_bias) {  // rows [a, b) of each half, the part's experts; down's bias in one part only
            const int64_t in_rows = (W.gated() ? 2 : 1) * L.n_ff;
            L.in_bias = new_bias(in_rows, L.n_expert, W.in_bias->name);
            for (int64_t e = 0; e < L.n_expert; ++e) {
                for (int64_t half = 0; half < (W.gated() ? 2 : 1); ++half) {
                    std::memcpy((float *) L.in_bias->data + e * in_rows + half * L.n_ff,
                                (const float *) W.in_bias->data + (e0 + e) * W.in_rows() + half * W.n_ff + a,
                                L.n_ff * sizeof(float));
                }
            }
        }
        if (W.out_bias && (by == Split::Experts || a == 0)) {
            L.out_bias = new_bias(L.n_embd, L.n_expert, W.out_bias->name);
            std::memcpy(L.out_bias->data, (const float *) W.out_bias->data + e0 * W.n_embd, ggml_nbytes(L.out_bias));
        }
        // Separate gate and up of one type become one gate_up part (gate rows, then up rows of each
        // expert): one MUL_MAT_ID instead of two, x quantized once.
        const bool fuse = W.gate && W.up && W.gate->type == W.up->type;
        std::vector<std::vector<const ggml_tensor *>> sources;  // per part tensor: its row sources
        if (fuse) {
            sources = { { W.gate, W.up }, { W.down } };
        } else {
            for (ggml_tensor * src : W.tensors()) {
                sources.push_back({ src });
            }
        }
        for (const auto & from_tensors : sources) {
            const ggml_tensor * src  = from_tensors[0];
            const bool          down = src == W.down;
            const bool          pair = from_tensors.size() == 2 || src == W.gate_up;  // rows of gate, then of up
            const int64_t       rows = pair ? 2 * L.n_ff : L.n_ff;
            ggml_tensor * t = down ? ggml_new_tensor_3d(meta_, src->type, c1 - c0, L.n_embd, L.n_expert)
                                   : ggml_new_tensor_3d(meta_, src->type, L.n_embd, rows, L.n_expert);
            const std::string name = fuse && !down ? "blk." + std::to_string(W.index) + ".ffn_gate_up_exps.weight"
                                                   : std::string(src->name);
            ggml_set_name(t, name.c_str());
            (down ? L.down : pair ? L.gate_up : src == W.gate ? L.gate : L.up) = t;
            ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(cpu_buft, ggml_nbytes(t));
            if (!buf) {
                fail(ErrorKind::Runtime, "out of memory for a part of '" + name + "'");
            }
            slice_bufs_.push_back(buf);
            ggml_backend_tensor_alloc(buf, t, ggml_backend_buffer_get_base(buf));
            char * to = (char *) t->data;
            if (down) {  // columns [c0, c1) of every row: whole blocks
                const size_t skip = ggml_row_size(src->type, c0), len = ggml_row_size(src->type, c1 - c0);
                for (int64_t e = 0; e < L.n_expert; ++e) {
                    for (int64_t r = 0; r < L.n_embd; ++r) {
                        std::memcpy(to + e * t->nb[2] + r * t->nb[1],
                                    (const char *) src->data + (e0 + e) * src->nb[2] + r * src->nb[1] + skip, len);
                    }
                }
            } else {  // rows [a, b) of each source, or [a, b) and [F + a, F + b) of a fused gate_up
                for (int64_t half = 0; half < (pair ? 2 : 1); ++half) {
                    const bool two = from_tensors.size() == 2;
                    copy_expert_rows(to + half * L.n_ff * t->nb[1], t->nb[2], two ? from_tensors[half] : src, e0,
                                     L.n_expert, two ? a : half * W.n_ff + a, L.n_ff);
                }
            }
            if (!cpu_supports_experts_of_type(t->type, t->ne, cpu_buft)) {
                fail(ErrorKind::Value, std::string("a ") + std::to_string(L.n_ff) + "-row part of '" + name +
                                           "' (" + ggml_type_name(t->type) + ") cannot be multiplied by ggml's CPU "
                                           "backend; use fewer nodes");
            }
            if (add_repacked(t, t->data)) {  // only the repacked copy runs: free the plain one
                slice_bufs_.pop_back();
                ggml_backend_buffer_free(buf);
                t->buffer = nullptr;
                t->data   = nullptr;
            }
            const uint64_t n = std::min<uint64_t>(ggml_nbytes(t), planned - placed);  // never past the plan
            placed += n;
            PlacementProgress::done += n;
        }
    }
    PlacementProgress::done += planned - placed;
}

}  // namespace lvgg
