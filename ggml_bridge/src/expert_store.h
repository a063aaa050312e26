// ExpertStore: the routed experts of every MoE layer of one GGUF file, ready for ggml.
//
// The file (or every part of a split GGUF, end to end in one mapping) is memory-mapped and only
// its expert tensors' pages are read: a llama.cpp GGUF serves as it is, its other tensors
// untouched. Each layer's expert tensors (blk.N.ffn_{gate,up,down}_exps,
// or the fused blk.N.ffn_gate_up_exps) are found, checked for shape and type, and either
// used in place or also copied into ggml's CPU "repack" buffers (interleaved layouts whose
// kernels are faster for few tokens) where ggml has such a layout for the type. With
// keep_mapped, both stay resident and the engine picks per batch size (measured: repacked
// Q4_K wins up to ~100 tokens per call, the mapped layout is 2x faster at 512); without it the
// mapped pages of repacked tensors are released and only the repacked copy runs.
#pragma once

#include <ggml-backend.h>
#include <ggml.h>
#include <gguf.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace lvgg {

// One MoE layer's experts, as stored in the file. Forms: gate+up+down (gated), gate_up+down (gated, fused, gate
// rows first), up+down (ungated, e.g. ReLU^2 models); each with or without per-expert biases (gpt-oss:
// blk.N.ffn_{gate,up,down}_exps.bias).
struct ExpertLayer {
    int           index    = -1;
    int64_t       n_expert = 0;  // experts held
    int64_t       first_expert   = 0;  // the router's index of the first one held (an expert-parallel part's)
    int64_t       routed_experts = 0;  // experts the router picks from: ids run 0..routed_experts-1
    int64_t       n_embd   = 0;  // D: hidden size, rows of down
    int64_t       n_ff     = 0;  // F: expert intermediate size
    // A rows part's down holds whole blocks around its intermediate rows (ggml multiplies whole
    // blocks): its columns start this many rows before the part's first, and the activations are
    // zero-padded to down_cols() before down.
    int64_t       down_lead = 0;
    ggml_tensor * gate     = nullptr;
    ggml_tensor * up       = nullptr;
    ggml_tensor * gate_up  = nullptr;
    ggml_tensor * down     = nullptr;
    // Biases, f32 in the store's own memory: in_bias [rows of gate_up (each expert's gate bias, then
    // its up bias; an ungated layer's up bias), experts], out_bias [D, experts]. nullptr where the file
    // has none; of a rows part's, only the first part's has out_bias (the parts' outputs sum).
    ggml_tensor * in_bias  = nullptr;
    ggml_tensor * out_bias = nullptr;

    bool                       gated() const { return gate || gate_up; }
    int64_t                    in_rows() const { return gated() ? 2 * n_ff : n_ff; }
    int64_t                    down_cols() const { return down->ne[0]; }  // n_ff, or a rows part's padded width
    // A part of whole experts (expert parallel): the slots routed to other parts' experts are left out.
    bool                       holds_some_experts() const { return n_expert < routed_experts; }
    std::vector<ggml_tensor *> tensors() const;
};

// How a store is split into parts, whose outputs sum to the layer's:
// - Rows: intermediate rows of every expert in units of 32, vLLM's tensor-parallel share; a part
//   whose rows end inside a block of down holds the whole block (the least bytes per part: parts
//   with memory of their own, NUMA nodes or ranks on nodes of their own);
// - Blocks: intermediate rows in whole blocks of down, parts a block apart in size (the least
//   bytes in all: ranks sharing a node's memory, with cores in proportion to their bytes);
// - Experts: whole experts (expert parallel; a part computes the routed slots of the experts it
//   holds).
enum class Split { Rows, Blocks, Experts };

// What a part holds of a layer, each as [begin, end): intermediate rows of gate/up, columns of
// down (whole blocks around the rows) and experts (the layer's own numbering).
struct PartShape {
    std::pair<int64_t, int64_t> rows, columns, experts;
};

// Bytes of expert tensors every store of this process has placed so far (mapped and checked,
// copied into a part, repacked), and the bytes the stores being made will place in all: what a
// caller polls (from another thread) to show the progress of a long start.
struct PlacementProgress {
    static std::atomic<uint64_t> done;
    static std::atomic<uint64_t> total;
};

// Fault the pages of the mapped range [address, address + size) into memory (a file's pages are
// read from disk), a chunk at a time, counted in PlacementProgress: before CUDA pins a range,
// which would do the same in one silent call. Throws ValueError for a range that is not mapped.
void read_in(uintptr_t address, size_t size);

class ExpertStore {
  public:
    // `only_layers` (when not empty): keep these MoE layers only (a pipeline-parallel rank's); the
    // others are checked in the header but their bytes are never touched.
    // `own_kernels`: the types lvgg's kernel set in use runs go into lvgg's packed layout (vnni_kquants.h)
    // rather than ggml's repacked one (repack must be on).
    // `paths`: one GGUF file, or every part of a split one in order (llama.cpp's split.* keys are
    // checked: count, numbering, tensors in all, no tensor twice).
    ExpertStore(const std::vector<std::string> & paths, bool repack, bool keep_mapped,
                const std::vector<int> & only_layers = {}, bool own_kernels = true);
    // Every check the constructor makes of the files' headers (a split set's keys, tensors within
    // the files, expert shapes and types), without mapping or reading any tensor; throws as it does.
    // Returns the first file's architecture keys (general.architecture, lvgg.architecture; absent
    // ones left out) and, per MoE layer, {routed experts, hidden size, expert intermediate size,
    // 1 where the experts have biases}.
    struct Headers {
        std::map<std::string, std::string>         architecture;
        std::map<int, std::array<int64_t, 4>>      layers;
    };
    static Headers check_files(const std::vector<std::string> & paths);
    // Part `part` of `n_parts` of another store's experts, for one NUMA node or rank: what
    // part_shape() names of every layer (of both halves of a fused gate_up). Copied into memory
    // this thread touches first (call it from a thread bound to the node), repacked where ggml has
    // a layout for the type (then only the repacked copy stays).
    ExpertStore(const ExpertStore & whole, int part, int n_parts, bool repack, Split by = Split::Rows);
    // The intermediate rows [begin, end) part `part` of `n_parts` holds, spread as evenly as their
    // units go. Rows: units of 32 rows (whole rows of ggml's interleaved layouts and of lvgg's
    // packed groups), F / n_parts each, vLLM's tensor-parallel share, when that is a multiple of 32;
    // Blocks: whole blocks of the down type (of 32 values or more). Where F is not a multiple of
    // 32, whole blocks either way.
    static std::pair<int64_t, int64_t> part_range(const ExpertLayer & L, int part, int n_parts,
                                                  Split by = Split::Rows);
    // What part `part` of `n_parts` holds of L. By rows or blocks: rows part_range() of every
    // expert and the whole blocks of down around them (the part pads its activations with zeros
    // to them, see down_lead). By experts: all rows of experts as evenly as they go, the first
    // parts taking one more (vLLM's linear placement).
    static PartShape                   part_shape(const ExpertLayer & L, int part, int n_parts, Split by);
    // The most parts every layer can be split into (F in part_range's units, or its experts).
    int64_t                            max_parts(Split by = Split::Rows) const;
    // The expert bytes part(part, n_parts, by) would hold.
    size_t                             part_bytes(int part, int n_parts, Split by) const;
    ~ExpertStore();
    ExpertStore(const ExpertStore &)             = delete;
    ExpertStore & operator=(const ExpertStore &) = delete;

    const std::string &                path() const { return path_; }
    const std::string &                architecture() const { return architecture_; }
    const std::map<int, ExpertLayer> & layers() const { return layers_; }
    const ExpertLayer &                layer(int index) const;  // throws IndexError
    // The repacked copy of an expert tensor, or nullptr where there is none. Separate gate and up
    // of one type share one: [D, 2F, experts], gate rows then up rows, like a file's gate_up.
    ggml_tensor *                      repacked(const ggml_tensor * t) const;
    // The twin is in lvgg's packed layout (vnni_kquants.h): only the engine's own kernels read it.
    bool                               packed(const ggml_tensor * twin) const;
    // Bytes of whole pages from a packed twin's start that hold its bytes and nothing else's.
    static size_t                      twin_pages(const ggml_tensor * twin);
    bool                               keeps_mapped() const { return keep_mapped_; }
    // Bytes of the mapping: the file's, or a split file's parts end to end, each from a page boundary.
    size_t                             file_size() const { return file_size_; }
    // Start of the read-only mapping of the whole file (nullptr when the file has no experts).
    const void *                       mapping() const { return map_; }
    int64_t                            n_tensors() const;
    // The (first) file's header: its metadata.
    const gguf_context *               gguf() const { return shards_.empty() ? nullptr : shards_[0].gguf; }

  private:
    ExpertStore() = default;
    // One file of the store's (a split GGUF's part): its header, and where its bytes start in the mapping.
    struct Shard {
        std::string    path;
        size_t         size = 0;
        size_t         base = 0;
        gguf_context * gguf = nullptr;
        ggml_context * meta = nullptr;
    };

    void open_and_validate(const std::vector<std::string> & paths);
    void check_split_set() const;
    void collect_layers();
    void keep_only(const std::vector<int> & layers);
    void map_files();
    void check_cpu_type(const ggml_tensor * t) const;  // throws where ggml's CPU cannot multiply it
    void place_weights(bool repack, bool populate);
    void slice_from(const ExpertStore & whole, int part, int n_parts, bool repack, Split by);
    ggml_tensor * add_repacked(ggml_tensor * t, const void * src);  // nullptr: no layout for the type
    bool          add_fused_gate_up(const ExpertLayer & L, std::vector<char> & staging);  // false: not possible
    ggml_tensor * new_packed_twin(ggml_type type, const int64_t ne[3], const std::string & name);
    ggml_tensor * new_bias(int64_t rows, int64_t experts, const std::string & name);  // f32, zeroed
    void          check_biases(const ExpertLayer & L) const;
    void          place_biases(ExpertLayer & L);
    static int    pack_threads();
    static size_t twin_page();
    void release();

    std::string                        path_;  // the (first) file's, as messages name the store
    std::string                        architecture_;
    size_t                             file_size_ = 0;
    std::vector<Shard>                 shards_;  // a part (ExpertStore::part) has none
    std::map<const ggml_tensor *, size_t> file_at_;  // expert tensor -> offset of its bytes in the mapping
    std::map<int, std::map<std::string, ggml_tensor *>> file_biases_;  // layer -> gate/up/down -> the file's bias
    ggml_context *                     meta_      = nullptr;  // a part's tensors
    void *                             map_       = nullptr;
    ggml_backend_buffer_t              map_buf_   = nullptr;
    bool                               keep_mapped_ = true;
    bool                               repack_      = false;
    bool                               own_kernels_ = true;
    ggml_context *                     repacked_ctx_ = nullptr;
    std::vector<ggml_backend_buffer_t> repack_bufs_;
    std::vector<ggml_backend_buffer_t> slice_bufs_;  // a part's plain (not repacked) tensors
    std::map<const ggml_tensor *, ggml_tensor *> repacked_;
    std::set<const ggml_tensor *>      packed_;  // twins in lvgg's packed layout
    std::map<int, ExpertLayer>         layers_;
};

// ggml's CPU backend can run MUL_MAT_ID with weights of this type (with or without repack).
bool cpu_supports_experts_of_type(ggml_type type, const int64_t ne[3], ggml_backend_buffer_type_t buft);

}  // namespace lvgg
