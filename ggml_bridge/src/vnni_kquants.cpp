#include "vnni_kquants.h"

// ggml's block layouts and the IQ2/IQ3 types' grid tables (static tables in this file's copy)
#define GGML_COMMON_DECL_CPP
#define GGML_COMMON_IMPL_CPP
#include "ggml-common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#    define LVGG_VNNI 1
#else
#    define LVGG_VNNI 0
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#    define LVGG_AVX2 1
#else
#    define LVGG_AVX2 0
#endif
#define LVGG_KERNELS (LVGG_VNNI || LVGG_AVX2)
// The IQ2/IQ3 kernels look their grids up with VPERMI2B (AVX-512 VBMI)
#if LVGG_VNNI && defined(__AVX512VBMI__)
#    define LVGG_GRID_LOOKUP 1
#else
#    define LVGG_GRID_LOOKUP 0
#endif
#if LVGG_KERNELS
#    include <immintrin.h>
// The kernels keep their per-token accumulators and unpacked weights in registers only when
// every small loop is unrolled (GCC -O3 left them on the stack otherwise: a 30B-A3B Q4_K layer
// took 1.5x as long at 8 tokens and 1.6x at 512).
#    define LVGG_UNROLL _Pragma("GCC unroll 8")
#endif

namespace lvgg::vnni {

namespace {

constexpr int64_t kBlock = 256;

// ggml's block layouts (ggml-common.h), by offset.
constexpr size_t kQ2KBytes   = 84;   // sm[16] (4-bit scale | 4-bit min << 4 per 16 values), qs[64] (2-bit), d, dmin
constexpr size_t kQ3KBytes   = 110;  // hmask[32], qs[64] (2-bit), scales[12] (6-bit, minus 32), d (fp16)
constexpr size_t kQ4KBytes   = 144;  // d, dmin (fp16), scales[12] (6-bit sc and m), qs[128]
constexpr size_t kQ5KBytes   = 176;  // d, dmin (fp16), scales[12] (as Q4_K's), qh[32], qs[128]
constexpr size_t kQ6KBytes   = 210;  // ql[128], qh[64], scales[16] (int8), d (fp16)
constexpr size_t kIQ4XSBytes = 136;  // d (fp16), scales_h (2 high bits each), scales_l[4] (4 low bits), qs[128]

// The values of IQ4_NL's (and IQ4_XS's) and MXFP4's (e2m1, doubled) 4-bit codes (ggml-common.h).
constexpr int8_t kIQ4NLValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int8_t kMXFP4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// The kernels look IQ4 codes up as value + 128 (unsigned, for VPDPBUSD) and take 128 * sum(x) back;
// MXFP4's as value + 12 (0..24: AVX2's VPMADDUBSW multiplies them exactly without the sign trick
// weights above kAvx2Max need, and sums four products in int16).
constexpr int32_t kLookupOffset = 128;
constexpr int     kAvx2Max      = 128;  // the largest unsigned weight VPMADDUBSW multiplies exactly

// Packed tile sizes and offsets (see the header).
constexpr size_t kQ4KTile = 2368, kQ4KSc = 64, kQ4KM = 192, kQ4KQs = 320;
constexpr size_t kQ5KTile = 2880;  // Q4_K's with each sub-block's qs followed by its fifth bits (64 bytes)
constexpr size_t kQ2KTile = 1344, kQ2KSm = 64, kQ2KQs = 320;  // qs: 128 bytes per 32-column chunk
constexpr size_t kQ3KTile = 1792, kQ3KQs = 256;               // qs: 192 bytes per 32-column chunk
constexpr size_t kIQ4XSTile = 2176, kIQ4XSQs = 128;
// Q6_K: runs of two 32-column chunks: sc pairs of both (64 bytes), then per chunk qh (128), ql (256).
constexpr size_t kQ6KTile = 3328, kQ6KRun = 832;

// Types of 32-value blocks with one scale each (Q8_0, Q4_0, IQ4_NL, MXFP4): per 256 columns, units
// of `blocks` blocks: the 16 rows' scales of each block (64 bytes in all), then each block's weights.
struct Format32 {
    int            blocks;       // per unit
    size_t         scale_bytes;  // per row and block: fp16 d, or MXFP4's e8m0 exponent
    int            bits;         // per weight: 8 (Q8_0) or 4
    int32_t        offset;       // the packed (unsigned) weight minus this is the code's value
    const int8_t * values;       // 4-bit codes' values (looked up), or none
    size_t         qs_bytes() const { return bits == 8 ? 512 : 256; }
    size_t         unit_bytes() const { return 64 + blocks * qs_bytes(); }
    size_t         tile_bytes() const { return (8 / blocks) * unit_bytes(); }
    size_t         block_bytes() const { return scale_bytes + 4 * bits; }  // in the file
};

constexpr Format32 format32(ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q8_0: return {2, 2, 8, 128, nullptr};
        case GGML_TYPE_Q4_0: return {2, 2, 4, 8, nullptr};
        case GGML_TYPE_IQ4_NL: return {2, 2, 4, kLookupOffset, kIQ4NLValues};
        default: return {4, 1, 4, 12, kMXFP4Values};  // MXFP4
    }
}

// The IQ2/IQ3 types: indices of grid entries of 4 (IQ3) or 8 (IQ2) values each (ggml-common.h's
// tables), a sign per value and a 4-bit scale s per 32 or 16 values: value = d * factor * (2 s + 1)
// * grid * sign. The kernels look up 64 indices at once per value of an entry (VPERMI2B on tables
// of its entries' codes: GridCodes): a chunk of 32 columns holds runs of 64 indices, 4 per
// row (IQ3 two runs of 16 columns, IQ2 one of 32), byte 4 r + i the index of row r's entry i; the
// lookup of value p gives the register of those 64 values, which multiplies the activations of
// columns p, 4 + p, ... of the run (ActOrder::kGrid16/kGrid32 put them next to each other).
struct GridFormat {
    int          entry_bytes;  // values per grid entry: 4 (IQ3) or 8 (IQ2)
    int          high_bits;    // bits of an index above its low byte: 0, 1 (IQ2_XS, IQ3_S) or 2 (IQ2_S)
    bool         scales16;     // a scale per 16 values (IQ2_XS, IQ2_S), else per 32
    int          offset;       // the largest grid value: weights are packed as offset +- grid (unsigned)
    float        factor;
    size_t       block_bytes;  // in the file
    const void * grid;
    int          grid_entries;
    constexpr int runs() const { return entry_bytes == 4 ? 2 : 1; }  // runs of 64 indices per chunk
    // a tile: the scales, the index high bits (per chunk a 64-bit mask per run and bit), then per
    // chunk its runs' index bytes and the signs (a 64-bit mask per run and value of an entry)
    constexpr size_t scale_bytes() const { return scales16 ? 128 : 64; }
    constexpr size_t high_chunk_bytes() const { return 8 * runs() * high_bits; }
    constexpr size_t high_bytes() const { return 8 * high_chunk_bytes(); }
    constexpr size_t index_bytes() const { return 64 * runs(); }  // per chunk
    constexpr size_t chunk_bytes() const { return index_bytes() + 64; }
    constexpr size_t tile_bytes() const { return scale_bytes() + high_bytes() + 8 * chunk_bytes(); }
};

bool is_grid_type(ggml_type type) {
    return type == GGML_TYPE_IQ2_XXS || type == GGML_TYPE_IQ2_XS || type == GGML_TYPE_IQ2_S ||
           type == GGML_TYPE_IQ3_XXS || type == GGML_TYPE_IQ3_S;
}

constexpr GridFormat grid_format(ggml_type type) {
    switch (type) {
        case GGML_TYPE_IQ2_XXS: return {8, 0, false, 43, 0.125f, sizeof(block_iq2_xxs), iq2xxs_grid, 256};
        case GGML_TYPE_IQ2_XS: return {8, 1, true, 43, 0.125f, sizeof(block_iq2_xs), iq2xs_grid, 512};
        case GGML_TYPE_IQ2_S: return {8, 2, true, 43, 0.125f, sizeof(block_iq2_s), iq2s_grid, 1024};
        case GGML_TYPE_IQ3_XXS: return {4, 0, false, 62, 0.25f, sizeof(block_iq3_xxs), iq3xxs_grid, 256};
        default: return {4, 1, false, 15, 1.0f, sizeof(block_iq3_s), iq3s_grid, 512};  // IQ3_S
    }
}

// Software prefetch distances (bytes ahead of the weights being read). Measured on the reference
// Xeon (16 threads, 30B-A3B Q4_K layer at 1 token): 0.351 ms without, 0.257 with 1024, 0.247
// with 2048 (ggml's kernels 0.569 / 0.358 / 0.333 in the same runs); Q6_K about the same with 0
// or 2048 and with 1024. On the 2-core EPYC one core streamed Q6_K from cold memory at 13.8 GB/s
// without, 16.0 with 1024 (means of 4 runs); Q4_K there was within noise either way. The other
// types use Q4_K's distance (not measured on their own).
constexpr size_t kQ4KPrefetch = 2048;
constexpr size_t kQ6KPrefetch = 1024;

const uint8_t * q6_K_scales(const uint8_t * tile, int h) { return tile + (h / 2) * kQ6KRun + 32 * (h % 2); }
const uint8_t * q6_K_qh(const uint8_t * tile, int h) { return tile + (h / 2) * kQ6KRun + 64 + 384 * (h % 2); }

size_t round64(size_t n) { return (n + 63) & ~size_t(63); }

bool has_32_blocks(ggml_type type) {
    return type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0 || type == GGML_TYPE_IQ4_NL || type == GGML_TYPE_MXFP4;
}

// The largest packed (unsigned) weight of a type, as the kernels multiply it.
constexpr int max_weight(ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q2_K: return 3;
        case GGML_TYPE_Q3_K: return 7;
        case GGML_TYPE_Q4_K: return 15;
        case GGML_TYPE_Q5_K: return 31;
        case GGML_TYPE_Q6_K: return 63;
        case GGML_TYPE_IQ4_XS: return max_weight(GGML_TYPE_IQ4_NL);
        case GGML_TYPE_IQ2_XXS:
        case GGML_TYPE_IQ2_XS:
        case GGML_TYPE_IQ2_S:
        case GGML_TYPE_IQ3_XXS:
        case GGML_TYPE_IQ3_S: return 2 * grid_format(type).offset;
        default: {  // Q8_0, Q4_0, IQ4_NL, MXFP4
            const Format32 f = format32(type);
            if (!f.values) {
                return (1 << f.bits) - 1;
            }
            int m = f.values[0];
            for (int i = 1; i < 16; ++i) {
                m = f.values[i] > m ? f.values[i] : m;
            }
            return m + f.offset;
        }
    }
}

// Types whose row groups keep the tiles' d (fp16 [16] per 256 columns) after the tiles.
bool d_after_tiles(ggml_type type) {
    return type == GGML_TYPE_Q6_K || type == GGML_TYPE_Q3_K || type == GGML_TYPE_IQ4_XS || is_grid_type(type);
}

size_t tile_bytes(ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q2_K: return kQ2KTile;
        case GGML_TYPE_Q3_K: return kQ3KTile;
        case GGML_TYPE_Q4_K: return kQ4KTile;
        case GGML_TYPE_Q5_K: return kQ5KTile;
        case GGML_TYPE_Q6_K: return kQ6KTile;
        case GGML_TYPE_IQ4_XS: return kIQ4XSTile;
        default: return is_grid_type(type) ? grid_format(type).tile_bytes() : format32(type).tile_bytes();
    }
}

// Rows of 32-value blocks may end inside a tile: the last tile keeps only the units it uses (the
// blocks after the row's last in its unit have scale 0 and are never read by the kernel).
size_t group_bytes(ggml_type type, int64_t cols) {
    const size_t nb = cols / kBlock;
    if (has_32_blocks(type)) {
        const Format32 f = format32(type);
        return nb * f.tile_bytes() + (cols % kBlock / 32 + f.blocks - 1) / f.blocks * f.unit_bytes();
    }
    return nb * tile_bytes(type) + (d_after_tiles(type) ? round64(nb * kRows * 2) : 0);
}

// Q4_K's and Q5_K's 6-bit scales and mins of the 8 sub-blocks, from the block's 12 bytes.
void decode_k_scales(const uint8_t * s, uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            sc[j] = s[j] & 63;
            m[j]  = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m[j]  = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
}

// One Q4_K block: 4-bit weights, 6-bit scales and mins. Q5_K (qh): each weight's fifth bit, for
// weight 64c + l (l < 32) bit 2c of byte l, for 64c + 32 + l bit 2c + 1.
void decode_q45_K(const uint8_t * qs, const uint8_t * qh, uint8_t q[256]) {
    for (int c = 0; c < 4; ++c) {  // 64 weights per 32 bytes: low nibbles first
        for (int l = 0; l < 32; ++l) {
            q[64 * c + l]      = qs[32 * c + l] & 0xF;
            q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
            if (qh) {
                q[64 * c + l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                q[64 * c + 32 + l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
            }
        }
    }
}

// One Q6_K block: 6-bit weights (0..63, value = d * sc * (q - 32)), int8 scales per 16.
void decode_q6_K(const uint8_t * blk, uint8_t q[256], int8_t sc[16]) {
    const uint8_t * ql = blk;
    const uint8_t * qh = blk + 128;
    std::memcpy(sc, blk + 192, 16);
    for (int half = 0; half < 2; ++half, ql += 64, qh += 32) {
        uint8_t * y = q + 128 * half;
        for (int l = 0; l < 32; ++l) {
            y[l]      = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
}

// Q2_K and Q3_K: 2-bit codes, weight 128h + 32j + l (l < 32) in bits 2j of byte 32h + l of qs.
// Q3_K (hmask): a third bit, bit 4h + j of hmask[l] (the file's code is q - 4 where it is clear;
// here q | 4 where it is set: value = scale * (q - 4)).
void decode_q23_K(const uint8_t * qs, const uint8_t * hmask, uint8_t q[256]) {
    for (int h = 0; h < 2; ++h) {
        for (int j = 0; j < 4; ++j) {
            for (int l = 0; l < 32; ++l) {
                uint8_t v = (qs[32 * h + l] >> (2 * j)) & 3;
                if (hmask) {
                    v |= ((hmask[l] >> (4 * h + j)) & 1) << 2;
                }
                q[128 * h + 32 * j + l] = v;
            }
        }
    }
}

// Q3_K's 16 6-bit scales (minus 32) from its 12 bytes: the low 4 bits of scale i in byte i % 8
// (high nibble for i >= 8), the high 2 in bits 2 (i / 4) of byte 8 + i % 4.
void decode_q3_K_scales(const uint8_t * s, int8_t sc[16]) {
    for (int i = 0; i < 16; ++i) {
        const int low = (i < 8 ? s[i] : s[i - 8] >> 4) & 0xF, high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        sc[i]         = (int8_t) ((low | (high << 4)) - 32);
    }
}

// IQ4_XS: codes laid out like IQ4_NL's per 32 (16 bytes: low nibbles first), 6-bit scales minus 32:
// sub-block j's low 4 bits in scales_l[j / 2] (low nibble first), high 2 in bits 2j of scales_h.
void decode_iq4_xs(const uint8_t * blk, uint8_t q[256], int8_t sc[8]) {
    const int scales_h = blk[2] | (blk[3] << 8);
    for (int j = 0; j < 8; ++j) {
        const int low = (blk[4 + j / 2] >> (4 * (j % 2))) & 0xF;
        sc[j]         = (int8_t) ((low | (((scales_h >> (2 * j)) & 3) << 4)) - 32);
        for (int l = 0; l < 16; ++l) {
            q[32 * j + l]      = blk[8 + 16 * j + l] & 0xF;
            q[32 * j + 16 + l] = blk[8 + 16 * j + l] >> 4;
        }
    }
}

// The column of the weight in byte p of the kernels' register k (k < 8; unpack_nibbles' order) of a
// 32-column chunk: k < 4 holds columns 4k..4k+3, k >= 4 columns 16 + 4(k - 4)...
int chunk_column(int k, int p) { return k < 4 ? 4 * k + p : 16 + 4 * (k - 4) + p; }

// Weights of columns c0 + 4i + p (low nibble) and c0 + 16 + 4i + p (high nibble), i < 4, of 16
// rows: 4 loads of 64 bytes (the qs / ql part of a tile for one 32-column sub-block).
void pack_nibbles(uint8_t q[kRows][256], int c0, uint8_t * dst) {
    for (int i = 0; i < 4; ++i) {
        for (int r = 0; r < kRows; ++r) {
            for (int p = 0; p < 4; ++p) {
                dst[(i * kRows + r) * 4 + p] = (q[r][c0 + chunk_column(i, p)] & 0xF) |
                                               ((q[r][c0 + chunk_column(4 + i, p)] & 0xF) << 4);
            }
        }
    }
}

// Bit `bit` of the weights of a 32-column chunk, of 16 rows (64 bytes): bit k of byte 4r + p is
// that of register k's weight (chunk_column).
void pack_bit(uint8_t q[kRows][256], int c0, int bit, uint8_t * dst) {
    for (int r = 0; r < kRows; ++r) {
        for (int p = 0; p < 4; ++p) {
            uint8_t v = 0;
            for (int k = 0; k < 8; ++k) {
                v |= ((q[r][c0 + chunk_column(k, p)] >> bit) & 1) << k;
            }
            dst[r * 4 + p] = v;
        }
    }
}

// The low 2 bits of the weights of a 32-column chunk, of 16 rows (128 bytes): bits 2k of byte
// 64s + 4r + p are those of register 4s + k's weight.
void pack_crumbs(uint8_t q[kRows][256], int c0, uint8_t * dst) {
    for (int s = 0; s < 2; ++s) {
        for (int r = 0; r < kRows; ++r) {
            for (int p = 0; p < 4; ++p) {
                uint8_t v = 0;
                for (int k = 0; k < 4; ++k) {
                    v |= (q[r][c0 + chunk_column(4 * s + k, p)] & 3) << (2 * k);
                }
                dst[64 * s + r * 4 + p] = v;
            }
        }
    }
}

// Q4_K and Q5_K (Q5: each sub-block's qs followed by its fifth bits).
template <bool Q5> void pack_group_q45_K(const uint8_t * src, size_t row_bytes, int64_t nb, uint8_t * dst) {
    constexpr size_t kTile = Q5 ? kQ5KTile : kQ4KTile, kSub = Q5 ? 320 : 256;
    constexpr size_t kBytes = Q5 ? kQ5KBytes : kQ4KBytes;
    uint8_t          q[kRows][256], sc[kRows][8], m[kRows][8];
    for (int64_t b = 0; b < nb; ++b, dst += kTile) {
        for (int r = 0; r < kRows; ++r) {
            const uint8_t * blk = src + r * row_bytes + b * kBytes;
            decode_k_scales(blk + 4, sc[r], m[r]);
            decode_q45_K(blk + (Q5 ? 48 : 16), Q5 ? blk + 16 : nullptr, q[r]);
            std::memcpy(dst + 2 * r, blk, 2);            // d
            std::memcpy(dst + 32 + 2 * r, blk + 2, 2);   // dmin
        }
        for (int j = 0; j < 8; ++j) {
            for (int r = 0; r < kRows; ++r) {
                dst[kQ4KSc + j * kRows + r]                   = sc[r][j];
                dst[kQ4KM + ((j / 2) * kRows + r) * 2 + j % 2] = m[r][j];
            }
            pack_nibbles(q, 32 * j, dst + kQ4KQs + j * kSub);
            if (Q5) {
                pack_bit(q, 32 * j, 4, dst + kQ4KQs + j * kSub + 256);
            }
        }
    }
}

// The fp16 d of 16 rows' blocks b of types that keep them after the tiles (d_after_tiles), at
// `d_at` in each row's block; the padding after them is zeroed (no stale bytes).
void pack_trailing_d(const uint8_t * src, size_t row_bytes, size_t block_bytes, size_t d_at, int64_t nb,
                     uint8_t * d) {
    std::memset(d + nb * kRows * 2, 0, round64(nb * kRows * 2) - nb * kRows * 2);
    for (int64_t b = 0; b < nb; ++b) {
        for (int r = 0; r < kRows; ++r) {
            std::memcpy(d + (b * kRows + r) * 2, src + r * row_bytes + b * block_bytes + d_at, 2);
        }
    }
}

void pack_group_q6_K(const uint8_t * src, size_t row_bytes, int64_t nb, uint8_t * dst) {
    uint8_t q[kRows][256];
    int8_t  sc[kRows][16];
    pack_trailing_d(src, row_bytes, kQ6KBytes, 208, nb, dst + nb * kQ6KTile);
    for (int64_t b = 0; b < nb; ++b, dst += kQ6KTile) {
        for (int r = 0; r < kRows; ++r) {
            decode_q6_K(src + r * row_bytes + b * kQ6KBytes, q[r], sc[r]);
        }
        for (int h = 0; h < 8; ++h) {  // 32-column chunks: sub-blocks 2h, 2h + 1
            uint8_t * scales = (uint8_t *) q6_K_scales(dst, h);
            for (int r = 0; r < kRows; ++r) {
                scales[2 * r]     = (uint8_t) sc[r][2 * h];
                scales[2 * r + 1] = (uint8_t) sc[r][2 * h + 1];
            }
            uint8_t * qh = (uint8_t *) q6_K_qh(dst, h);
            pack_nibbles(q, 32 * h, qh + 128);
            for (int s = 0; s < 2; ++s) {
                for (int r = 0; r < kRows; ++r) {
                    for (int p = 0; p < 4; ++p) {
                        const int c = 32 * h + 4 * (2 * s) + p;  // load 2s; load 2s + 1 is 4 columns on
                        qh[(s * kRows + r) * 4 + p] = (uint8_t) ((q[r][c] >> 4) | ((q[r][c + 16] >> 4) << 2) |
                                                                 ((q[r][c + 4] >> 4) << 4) |
                                                                 ((q[r][c + 20] >> 4) << 6));
                    }
                }
            }
        }
    }
}

// Q2_K (d, dmin, then the scale|min bytes of both sub-blocks of each chunk, then the chunks' 2-bit
// weights) and Q3_K (the int8 scale pairs, then per chunk the low 2 bits and the third; d after
// the tiles).
template <bool Q3> void pack_group_q23_K(const uint8_t * src, size_t row_bytes, int64_t nb, uint8_t * dst) {
    constexpr size_t kTile = Q3 ? kQ3KTile : kQ2KTile, kBytes = Q3 ? kQ3KBytes : kQ2KBytes;
    constexpr size_t kScales = Q3 ? 0 : kQ2KSm, kQs = Q3 ? kQ3KQs : kQ2KQs, kChunk = Q3 ? 192 : 128;
    uint8_t          q[kRows][256], sc[kRows][16];
    if (Q3) {
        pack_trailing_d(src, row_bytes, kQ3KBytes, 108, nb, dst + nb * kQ3KTile);
    }
    for (int64_t b = 0; b < nb; ++b, dst += kTile) {
        for (int r = 0; r < kRows; ++r) {
            const uint8_t * blk = src + r * row_bytes + b * kBytes;
            if (Q3) {
                decode_q23_K(blk + 32, blk, q[r]);
                decode_q3_K_scales(blk + 96, (int8_t *) sc[r]);
            } else {
                decode_q23_K(blk + 16, nullptr, q[r]);
                std::memcpy(sc[r], blk, 16);
                std::memcpy(dst + 2 * r, blk + 80, 2);       // d
                std::memcpy(dst + 32 + 2 * r, blk + 82, 2);  // dmin
            }
        }
        for (int h = 0; h < 8; ++h) {
            for (int r = 0; r < kRows; ++r) {
                dst[kScales + (h * kRows + r) * 2]     = sc[r][2 * h];
                dst[kScales + (h * kRows + r) * 2 + 1] = sc[r][2 * h + 1];
            }
            pack_crumbs(q, 32 * h, dst + kQs + h * kChunk);
            if (Q3) {
                pack_bit(q, 32 * h, 2, dst + kQs + h * kChunk + 128);
            }
        }
    }
}

void pack_group_iq4_xs(const uint8_t * src, size_t row_bytes, int64_t nb, uint8_t * dst) {
    uint8_t q[kRows][256];
    int8_t  sc[kRows][8];
    pack_trailing_d(src, row_bytes, kIQ4XSBytes, 0, nb, dst + nb * kIQ4XSTile);
    for (int64_t b = 0; b < nb; ++b, dst += kIQ4XSTile) {
        for (int r = 0; r < kRows; ++r) {
            decode_iq4_xs(src + r * row_bytes + b * kIQ4XSBytes, q[r], sc[r]);
        }
        for (int j = 0; j < 8; ++j) {
            for (int r = 0; r < kRows; ++r) {
                dst[j * kRows + r] = (uint8_t) sc[r][j];
            }
            pack_nibbles(q, 32 * j, dst + kIQ4XSQs + j * 256);
        }
    }
}

// ggml's ksigns_iq2xs entry k (7 bits): bit b is value b's sign (1: minus), the 8th making the count
// of minus signs even.
uint8_t ksigns(uint32_t k) {
    k &= 127;
    return (uint8_t) (k | ((__builtin_popcount(k) & 1) << 7));
}

uint32_t u32_at(const uint8_t * p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// One IQ2/IQ3 block (ggml-quants.c's dequantize_row_iq*): the grid index of each entry (64 of 4
// values, or 32 of 8), each value's sign (1: minus) and the 4-bit scale s of each 16 values.
void decode_grid(ggml_type type, const uint8_t * blk, uint16_t index[64], uint8_t minus[256], uint8_t s[16]) {
    auto signs8 = [&](int at, uint8_t bits) {  // the signs of values at..at + 7
        for (int b = 0; b < 8; ++b) {
            minus[at + b] = (bits >> b) & 1;
        }
    };
    for (int j = 0; j < 8; ++j) {  // 32-value sub-blocks
        switch (type) {
            case GGML_TYPE_IQ2_XXS: {  // 4 index bytes, then 4 7-bit ksigns entries and s (top 4 bits)
                const uint32_t q = u32_at(blk + 2 + 8 * j), w = u32_at(blk + 6 + 8 * j);
                for (int l = 0; l < 4; ++l) {
                    index[4 * j + l] = (q >> (8 * l)) & 255;
                    signs8(32 * j + 8 * l, ksigns(w >> (7 * l)));
                }
                s[2 * j] = s[2 * j + 1] = w >> 28;
                break;
            }
            case GGML_TYPE_IQ2_XS:  // a 16-bit word per entry: 9-bit index, 7-bit ksigns entry
                for (int l = 0; l < 4; ++l) {
                    const uint32_t q = blk[2 + 2 * (4 * j + l)] | (blk[3 + 2 * (4 * j + l)] << 8);
                    index[4 * j + l] = q & 511;
                    signs8(32 * j + 8 * l, ksigns(q >> 9));
                }
                s[2 * j] = blk[66 + j] & 15, s[2 * j + 1] = blk[66 + j] >> 4;
                break;
            case GGML_TYPE_IQ2_S:  // index low bytes, sign bytes, 2 high bits per index, scales
                for (int l = 0; l < 4; ++l) {
                    index[4 * j + l] = blk[2 + 4 * j + l] | (((blk[66 + j] >> (2 * l)) & 3) << 8);
                    signs8(32 * j + 8 * l, blk[34 + 4 * j + l]);
                }
                s[2 * j] = blk[74 + j] & 15, s[2 * j + 1] = blk[74 + j] >> 4;
                break;
            case GGML_TYPE_IQ3_XXS: {  // 64 index bytes, then a word per sub-block as IQ2_XXS's
                const uint32_t w = u32_at(blk + 66 + 4 * j);
                for (int l = 0; l < 8; ++l) {
                    index[8 * j + l] = blk[2 + 8 * j + l];
                }
                for (int l = 0; l < 4; ++l) {
                    signs8(32 * j + 8 * l, ksigns(w >> (7 * l)));
                }
                s[2 * j] = s[2 * j + 1] = w >> 28;
                break;
            }
            default:  // IQ3_S: index low bytes, a 9th bit per index, sign bytes, scales
                for (int l = 0; l < 8; ++l) {
                    index[8 * j + l] = blk[2 + 8 * j + l] | (((blk[66 + j] >> l) & 1) << 8);
                }
                for (int l = 0; l < 4; ++l) {
                    signs8(32 * j + 8 * l, blk[74 + 4 * j + l]);
                }
                s[2 * j] = s[2 * j + 1] = (blk[106 + j / 2] >> (4 * (j % 2))) & 15;
                break;
        }
    }
}

int16_t load16(const void * p) {
    int16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

uint64_t u64_at(const uint8_t * p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

// The IQ2/IQ3 types (GridFormat): per tile the rows' scales (per chunk pair, or per chunk with a
// scale per 16: a byte per row, the first sub-block's s in the low nibble), the index high bits,
// then per chunk the low bytes of its runs' indices and their signs (bit 4 r + i of the mask of run
// u and value p: the sign of that value of row r's entry i).
template <ggml_type T> void pack_group_grid(const uint8_t * src, size_t row_bytes, int64_t nb, uint8_t * dst) {
    constexpr GridFormat f = grid_format(T);
    uint16_t             index[kRows][64];
    uint8_t              minus[kRows][256], s[kRows][16];
    pack_trailing_d(src, row_bytes, f.block_bytes, 0, nb, dst + nb * f.tile_bytes());
    for (int64_t b = 0; b < nb; ++b, dst += f.tile_bytes()) {
        for (int r = 0; r < kRows; ++r) {
            decode_grid(T, src + r * row_bytes + b * f.block_bytes, index[r], minus[r], s[r]);
        }
        std::memset(dst + f.scale_bytes(), 0, f.high_bytes() + 8 * f.chunk_bytes());
        for (int h = 0; h < 8; ++h) {
            uint8_t * high  = dst + f.scale_bytes() + h * f.high_chunk_bytes();
            uint8_t * chunk = dst + f.scale_bytes() + f.high_bytes() + h * f.chunk_bytes();
            for (int r = 0; r < kRows; ++r) {
                if (f.scales16) {
                    dst[16 * h + r] = (uint8_t) (s[r][2 * h] | (s[r][2 * h + 1] << 4));
                } else if (h % 2 == 0) {
                    dst[16 * (h / 2) + r] = (uint8_t) (s[r][2 * h] | (s[r][2 * h + 2] << 4));
                }
                for (int u = 0; u < f.runs(); ++u) {
                    for (int i = 0; i < 4; ++i) {
                        const int      at = 4 * r + i;
                        const uint16_t e  = index[r][4 * (f.runs() * h + u) + i];
                        chunk[64 * u + at] = (uint8_t) e;
                        for (int bit = 0; bit < f.high_bits; ++bit) {
                            high[8 * (u * f.high_bits + bit) + at / 8] |= (uint8_t) (((e >> (8 + bit)) & 1) << (at % 8));
                        }
                        for (int p = 0; p < f.entry_bytes; ++p) {  // the value's column in the chunk
                            const int c = 32 * h + (f.runs() == 2 ? 16 * u + 4 * i : 8 * i) + p;
                            chunk[f.index_bytes() + 8 * (u * f.entry_bytes + p) + at / 8] |=
                                (uint8_t) (minus[r][c] << (at % 8));
                        }
                    }
                }
            }
        }
    }
}

// The grids as the kernels look them up: each value is one of a few levels (IQ2: 3, IQ3: 8), so an
// entry is a code of 2 bytes, `per_byte` levels of `level_bits` each (IQ2: values 0..3, then 4..7;
// IQ3: 0, 1, then 2, 3); `levels` holds each level's value plus the type's offset (the weight where
// its sign is plus). valid: the grid has no more levels than that.
struct GridCodes {
    alignas(64) uint8_t bytes[2][1024];
    alignas(64) uint8_t levels[64];  // level l's value at every l + k 2^level_bits
    bool                valid;
};

constexpr int grid_level_bits(ggml_type type) { return grid_format(type).entry_bytes == 8 ? 2 : 3; }

template <ggml_type T> const GridCodes & grid_codes() {
    static const GridCodes codes = [] {
        constexpr GridFormat f = grid_format(T);
        constexpr int        bits = grid_level_bits(T), per_byte = f.entry_bytes / 2;
        const uint8_t *      grid = (const uint8_t *) f.grid;
        std::vector<uint8_t> values(grid, grid + f.grid_entries * f.entry_bytes);
        std::sort(values.begin(), values.end());
        values.erase(std::unique(values.begin(), values.end()), values.end());
        GridCodes c{};
        c.valid = values.size() <= (1u << bits) && values.back() <= f.offset;
        for (size_t l = 0; l < 64 && c.valid; ++l) {
            c.levels[l] = (uint8_t) (values[l % (1u << bits) % values.size()] + f.offset);
        }
        for (int e = 0; e < f.grid_entries && c.valid; ++e) {
            for (int p = 0; p < f.entry_bytes; ++p) {
                const size_t l = std::lower_bound(values.begin(), values.end(), grid[e * f.entry_bytes + p]) - values.begin();
                c.bytes[p / per_byte][e] |= (uint8_t) (l << (bits * (p % per_byte)));
            }
        }
        return c;
    }();
    return codes;
}

// Types of 32-value blocks (Format32): per block j, the rows' scales into its unit, and the weights
// as unsigned bytes (Q8_0: w + 128, for VPDPBUSD; the kernel takes 128 * sum(x) back) or 4-bit
// codes (laid out by pack_nibbles). n32: the row's 32-column blocks; the blocks after the last in
// its unit get scale 0 and zero weights.
template <ggml_type T> void pack_group_32(const uint8_t * src, size_t row_bytes, int64_t n32, uint8_t * dst) {
    constexpr Format32 F = format32(T);
    uint8_t            q[kRows][256];
    const uint8_t      zero[34] = {};
    for (int64_t b = 0; b < (n32 + 7) / 8; ++b, dst += F.tile_bytes()) {
        const int blocks = (int) std::min<int64_t>(8, n32 - b * 8);
        for (int j = 0; j < (blocks + F.blocks - 1) / F.blocks * F.blocks; ++j) {
            uint8_t * unit = dst + (j / F.blocks) * F.unit_bytes();
            uint8_t * qs   = unit + 64 + (j % F.blocks) * F.qs_bytes();
            for (int r = 0; r < kRows; ++r) {
                const uint8_t * blk = j < blocks ? src + r * row_bytes + (b * 8 + j) * F.block_bytes() : zero;
                std::memcpy(unit + (j % F.blocks) * kRows * F.scale_bytes + r * F.scale_bytes, blk, F.scale_bytes);
                for (int l = 0; l < 4 * F.bits; ++l) {
                    const uint8_t v = blk[F.scale_bytes + l];
                    if (F.bits == 4) {
                        q[r][32 * j + l]      = v & 0xF;
                        q[r][32 * j + 16 + l] = v >> 4;
                    } else {  // load l / 4, row r, byte l % 4
                        qs[((l / 4) * kRows + r) * 4 + l % 4] = v ^ 0x80;
                    }
                }
            }
            if (F.bits == 4) {
                pack_nibbles(q, 32 * j, qs);
            }
        }
    }
}

#if LVGG_KERNELS

#    define LVGG_INLINE inline __attribute__((always_inline))

// The vector operations the kernels use, per instruction set, on the rows of a group one register
// holds (a 32-bit lane per row): AVX-512 all 16, AVX2 8 (the kernels then run once per half, r0 = 0
// and 8). Per-row arrays in a tile (B bytes per row) are read from their row r0 on, the weights'
// 64-byte registers (4 bytes per row) from byte 4 r0.
#    if LVGG_VNNI
struct Vnni {
    using I                      = __m512i;
    using F                      = __m512;
    static constexpr int kLanes  = 16;
    static I             zero() { return _mm512_setzero_si512(); }
    static I             load(const uint8_t * p) { return _mm512_load_si512((const __m512i *) p); }
    static I             set8(int v) { return _mm512_set1_epi8((char) v); }
    static I             set16(int v) { return _mm512_set1_epi16((short) v); }
    static I             set32(int v) { return _mm512_set1_epi32(v); }
    static I             table16(const uint8_t * t) { return _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *) t)); }
    // per-row bytes to the rows' lanes (unsigned, signed), per-row byte pairs to int16 pairs
    static I u8_32(const uint8_t * p) { return _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *) p)); }
    static I s8_32(const uint8_t * p) { return _mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *) p)); }
    static I u8_16(const uint8_t * p) { return _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *) p)); }
    static I s8_16(const uint8_t * p) { return _mm512_cvtepi8_epi16(_mm256_load_si256((const __m256i *) p)); }
    static F f16(const uint8_t * p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p)); }
    static I and_(I a, I b) { return _mm512_and_si512(a, b); }
    static I and_or(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0xEA); }  // (a & b) | c
    template <int N> static I srli16(I a) { return _mm512_srli_epi16(a, N); }
    template <int N> static I slli16(I a) { return _mm512_slli_epi16(a, N); }
    template <int N> static I slli32(I a) { return _mm512_slli_epi32(a, N); }
    template <int N> static I srai32(I a) { return _mm512_srai_epi32(a, N); }
    static I shuffle8(I table, I idx) { return _mm512_shuffle_epi8(table, idx); }
    // the 2 bytes at p into the low (high) half of every lane, the other half zero
    static LVGG_INLINE I bcast16_low(const void * p) { return _mm512_maskz_set1_epi16(0x55555555, load16(p)); }
    static LVGG_INLINE I bcast16_high(const void * p) { return _mm512_maskz_set1_epi16(0xAAAAAAAA, load16(p)); }
    static I shr32(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
    // acc + each lane's 4 products of unsigned w and signed x bytes
    static LVGG_INLINE I dot4(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
    static I add(I a, I b) { return _mm512_add_epi32(a, b); }
    static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
    static I mul(I a, I b) { return _mm512_mullo_epi32(a, b); }
    static I dpwssd(I acc, I a, I b) { return _mm512_dpwssd_epi32(acc, a, b); }
    // int16 pairs per lane: the low halves of a, then of b
    static I pair16(I a, I b) { return _mm512_mask_blend_epi16(0xAAAAAAAA, a, _mm512_slli_epi32(b, 16)); }
    // The rows' dot products with 16 activations (4 broadcast to each lane per register): w[i] holds
    // columns 4i..4i+3, unsigned up to MaxW.
    template <int MaxW> static LVGG_INLINE I dot16(const I * w, const int8_t * xq) {
        I d = zero();
        LVGG_UNROLL
        for (int i = 0; i < 4; ++i) {
            d = _mm512_dpbusd_epi32(d, w[i], bcast32(xq + 4 * i));
        }
        return d;
    }
    static LVGG_INLINE I bcast32(const void * p) {
        int32_t v;
        std::memcpy(&v, p, 4);
        return set32(v);
    }
    // 2^(e - 128) from each row's e8m0 byte (ggml's ggml_e8m0_to_fp32_half: subnormal for e < 2)
    static F e8m0_half(const uint8_t * p) {
        const I e = u8_32(p);
        const I normal = _mm512_slli_epi32(_mm512_sub_epi32(e, set32(1)), 23);
        const I small  = _mm512_sllv_epi32(set32(0x00200000), e);
        return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmplt_epu32_mask(e, set32(2)), normal, small));
    }
    static F fset(float v) { return _mm512_set1_ps(v); }
    static F fzero() { return _mm512_setzero_ps(); }
    static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
    static F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
    static void store(float * p, F v) { _mm512_storeu_ps(p, v); }
};
#    endif

#    if LVGG_AVX2
struct Avx2 {
    using I                      = __m256i;
    using F                      = __m256;
    static constexpr int kLanes  = 8;
    static I             zero() { return _mm256_setzero_si256(); }
    static I             load(const uint8_t * p) { return _mm256_load_si256((const __m256i *) p); }
    static I             set8(int v) { return _mm256_set1_epi8((char) v); }
    static I             set16(int v) { return _mm256_set1_epi16((short) v); }
    static I             set32(int v) { return _mm256_set1_epi32(v); }
    static I table16(const uint8_t * t) { return _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *) t)); }
    static I u8_32(const uint8_t * p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) p)); }
    static I s8_32(const uint8_t * p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) p)); }
    static I u8_16(const uint8_t * p) { return _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *) p)); }
    static I s8_16(const uint8_t * p) { return _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *) p)); }
    static F f16(const uint8_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)); }
    static I and_(I a, I b) { return _mm256_and_si256(a, b); }
    static I and_or(I a, I b, I c) { return _mm256_or_si256(_mm256_and_si256(a, b), c); }
    template <int N> static I srli16(I a) { return _mm256_srli_epi16(a, N); }
    template <int N> static I slli16(I a) { return _mm256_slli_epi16(a, N); }
    template <int N> static I slli32(I a) { return _mm256_slli_epi32(a, N); }
    template <int N> static I srai32(I a) { return _mm256_srai_epi32(a, N); }
    static I shuffle8(I table, I idx) { return _mm256_shuffle_epi8(table, idx); }
    static LVGG_INLINE I bcast16_low(const void * p) { return _mm256_and_si256(set16(load16(p)), set32(0xFFFF)); }
    static LVGG_INLINE I bcast16_high(const void * p) { return _mm256_andnot_si256(set32(0xFFFF), set16(load16(p))); }
    static I shr32(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
    // (w <= kAvx2Max: VPMADDUBSW's pair sums cannot saturate)
    static LVGG_INLINE I dot4(I acc, I w, I x) {
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), set16(1)));
    }
    static I add(I a, I b) { return _mm256_add_epi32(a, b); }
    static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
    static I mul(I a, I b) { return _mm256_mullo_epi32(a, b); }
    static I dpwssd(I acc, I a, I b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
    static I pair16(I a, I b) { return _mm256_blend_epi16(a, _mm256_slli_epi32(b, 16), 0xAA); }
    // The rows' dot products of 16 activations with w - 128 (w unsigned, 0..255): the weights as
    // int8 (w ^ 0x80), their signs moved onto x (VPSIGNB) so VPMADDUBSW multiplies |w - 128| <= 128.
    static LVGG_INLINE I dot16_offset128(const I * w, const int8_t * xq) {
        const I ones = set16(1), top = set8(0x80);
        I       d    = zero();
        LVGG_UNROLL
        for (int i = 0; i < 4; ++i) {
            const I v = _mm256_xor_si256(w[i], top);
            const I p = _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(bcast32(xq + 4 * i), v));
            d         = _mm256_add_epi32(d, _mm256_madd_epi16(p, ones));
        }
        return d;
    }
    // VPMADDUBSW adds two u8 x s8 products in int16 with saturation: exact for u8 <= 128 (kAvx2Max).
    // Its int16 sums are added up further in int16 as far as MaxW allows (|x| <= 127). Weights up
    // to 255 take dot16_offset128.
    template <int MaxW> static LVGG_INLINE I dot16(const I * w, const int8_t * xq) {
        const I ones = set16(1);
        I       p[4];
        LVGG_UNROLL
        for (int i = 0; i < 4; ++i) {
            p[i] = _mm256_maddubs_epi16(w[i], bcast32(xq + 4 * i));
        }
        if constexpr (MaxW * 127 * 8 <= 32767) {
            return _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])), ones);
        } else if constexpr (MaxW * 127 * 4 <= 32767) {
            return _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(p[0], p[1]), ones),
                                    _mm256_madd_epi16(_mm256_add_epi16(p[2], p[3]), ones));
        } else {
            return _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(p[0], ones), _mm256_madd_epi16(p[1], ones)),
                                    _mm256_add_epi32(_mm256_madd_epi16(p[2], ones), _mm256_madd_epi16(p[3], ones)));
        }
    }
    static LVGG_INLINE I bcast32(const void * p) {
        int32_t v;
        std::memcpy(&v, p, 4);
        return set32(v);
    }
    static F e8m0_half(const uint8_t * p) {
        const I e      = u8_32(p);
        const I normal = _mm256_slli_epi32(_mm256_sub_epi32(e, set32(1)), 23);
        const I small  = _mm256_sllv_epi32(set32(0x00200000), e);
        return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, small, _mm256_cmpgt_epi32(set32(2), e)));
    }
    static F fset(float v) { return _mm256_set1_ps(v); }
    static F fzero() { return _mm256_setzero_ps(); }
    static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
    static F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
    static void store(float * p, F v) { _mm256_storeu_ps(p, v); }
};
#    endif

LVGG_INLINE void prefetch(const uint8_t * p, int lines) {
    LVGG_UNROLL
    for (int l = 0; l < lines; ++l) {
        _mm_prefetch((const char *) p + 64 * l, _MM_HINT_T0);
    }
}

// The nibbles of four 64-byte registers (pack_nibbles; qs at the rows' first byte): w[i] = the low
// nibbles, columns 4i..4i+3 of each row; w[4 + i] = the high ones, columns 16 + 4i...
template <class V> LVGG_INLINE void unpack_nibbles(const uint8_t * qs, typename V::I w[8]) {
    const typename V::I low4 = V::set8(0x0F);
    LVGG_UNROLL
    for (int i = 0; i < 4; ++i) {
        const typename V::I v = V::load(qs + 64 * i);
        w[i]                  = V::and_(v, low4);
        w[i + 4]              = V::and_(V::template srli16<4>(v), low4);
    }
}

// Bit `From` of each byte moved to bit `To` (bits that cross into the other byte of a 16-bit lane
// are masked off by the callers: From and To are < 8).
template <class V, int From, int To> LVGG_INLINE typename V::I bit_at(const typename V::I bits) {
    if constexpr (From < To) {
        return V::template slli16<To - From>(bits);
    } else if constexpr (From > To) {
        return V::template srli16<From - To>(bits);
    } else {
        return bits;
    }
}

// Q5_K's fifth bits (pack_bit: bit k of a byte is register k's) into w[k] as bit 4.
template <class V, int... K>
LVGG_INLINE void add_fifth_bits(const typename V::I hb, typename V::I w[8], std::integer_sequence<int, K...>) {
    const typename V::I bit4 = V::set8(0x10);
    ((w[K] = V::and_or(bit_at<V, K, 4>(hb), bit4, w[K])), ...);
}

// Q2_K's and Q3_K's weights of a 32-column chunk (pack_crumbs' two registers, then pack_bit's third
// bits with Q3): w[k] = the 2-bit field k % 4 of register k / 4 (| the third bit as bit 2).
template <class V, bool Q3, int... K>
LVGG_INLINE void unpack_crumbs(const uint8_t * qs, typename V::I w[8], std::integer_sequence<int, K...>) {
    const typename V::I low2 = V::set8(3), bit2 = V::set8(4);
    const typename V::I lo[2] = {V::load(qs), V::load(qs + 64)};
    if constexpr (Q3) {
        const typename V::I hb = V::load(qs + 128);
        ((w[K] = V::and_or(bit_at<V, 2 * (K % 4), 0>(lo[K / 4]), low2, V::and_(bit_at<V, K, 2>(hb), bit2))), ...);
    } else {
        ((w[K] = V::and_(bit_at<V, 2 * (K % 4), 0>(lo[K / 4]), low2)), ...);
    }
}

// The lookup table of a type's 4-bit codes (value + offset, unsigned), made once at compile time.
struct CodeTable {
    alignas(16) uint8_t bytes[16];
};

constexpr CodeTable code_table(const int8_t * values, int32_t offset) {
    CodeTable t{};
    for (int i = 0; i < 16; ++i) {
        t.bytes[i] = (uint8_t) (values[i] + offset);
    }
    return t;
}

constexpr CodeTable kIQ4NLTable = code_table(kIQ4NLValues, kLookupOffset);
constexpr CodeTable kMXFP4Table = code_table(kMXFP4Values, format32(GGML_TYPE_MXFP4).offset);
static_assert(format32(GGML_TYPE_IQ4_NL).offset == kLookupOffset, "IQ4_NL and IQ4_XS share one table");

template <class V> LVGG_INLINE void look_up(const typename V::I table, typename V::I w[8]) {
    LVGG_UNROLL
    for (int k = 0; k < 8; ++k) {
        w[k] = V::shuffle8(table, w[k]);
    }
}

// The rows' dot products of 32 activations (xsum: their sum) with w - Offset (w unsigned, up to
// MaxW), as two independent chains.
template <class V, int MaxW, int Offset>
LVGG_INLINE typename V::I dot32(const typename V::I * w, const int8_t * xq, int xsum) {
    if constexpr (V::kLanes == 8 && MaxW > kAvx2Max) {  // AVX2: VPMADDUBSW would saturate
        static_assert(Offset == 128, "weights above 128 are stored as value + 128");
        return V::add(V::dot16_offset128(w, xq), V::dot16_offset128(w + 4, xq + 16));
    } else {
        const typename V::I d = V::add(V::template dot16<MaxW>(w, xq), V::template dot16<MaxW>(w + 4, xq + 16));
        if constexpr (Offset == 0) {
            return d;
        } else {
            return V::sub(d, V::set32(Offset * xsum));
        }
    }
}

template <class V, int NT> LVGG_INLINE void store_rows(float * const * out, int r0, const typename V::F * res) {
    LVGG_UNROLL
    for (int n = 0; n < NT; ++n) {
        V::store(out[n] + r0, res[n]);
    }
}

// Q4_K and Q5_K (Q5: each sub-block's nibbles followed by its fifth bits).
template <class V, int NT, bool Q5>
void multiply_q45_K(const uint8_t * tile, int64_t nb, int r0, const ActBlock * const * x, float * const * out) {
    using I = typename V::I;
    using F = typename V::F;
    constexpr size_t kTile = Q5 ? kQ5KTile : kQ4KTile, kSub = Q5 ? 320 : 256;
    F                res[NT];
    std::fill(res, res + NT, V::fzero());
    for (int64_t b = 0; b < nb; ++b, tile += kTile) {
        I acc[NT], mins[NT];
        std::fill(acc, acc + NT, V::zero());
        std::fill(mins, mins + NT, V::zero());
        LVGG_UNROLL
        for (int p = 0; p < 4; ++p) {
            const I mv = V::u8_16(tile + kQ4KM + 32 * p + 2 * r0);
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {
                mins[n] = V::dpwssd(mins[n], mv, V::bcast32(x[n][b].bsum32 + 2 * p));
            }
        }
        for (int j = 0; j < 8; ++j) {
            const uint8_t * qs = tile + kQ4KQs + j * kSub;
            prefetch(qs + kQ4KPrefetch, kSub / 64);
            I w[8];
            unpack_nibbles<V>(qs + 4 * r0, w);
            if constexpr (Q5) {
                add_fifth_bits<V>(V::load(qs + 256 + 4 * r0), w, std::make_integer_sequence<int, 8>());
            }
            const I scv = V::u8_32(tile + kQ4KSc + 16 * j + r0);
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {
                acc[n] = V::add(acc[n], V::mul(dot32<V, max_weight(Q5 ? GGML_TYPE_Q5_K : GGML_TYPE_Q4_K), 0>(
                                                   w, x[n][b].qs + 32 * j, 0), scv));
            }
        }
        const F d = V::f16(tile + 2 * r0), dmin = V::f16(tile + 32 + 2 * r0);
        LVGG_UNROLL
        for (int n = 0; n < NT; ++n) {
            const F dx = V::fset(x[n][b].d);
            res[n]     = V::fmadd(V::cvt(acc[n]), V::fmul(d, dx), res[n]);
            res[n]     = V::fnmadd(V::cvt(mins[n]), V::fmul(dmin, dx), res[n]);
        }
    }
    store_rows<V, NT>(out, r0, res);
}

// K-quants with a scale per 16 values: Q6_K (d * sc * (q - 32), int8 scales), Q3_K (d * sc * (q - 4),
// int8 scales) and Q2_K (d * sc * q - dmin * m, 4-bit scale and min): the scales of each 32-column
// chunk's sub-blocks 2h, 2h + 1 as int16 pairs per row.
template <class V, int NT, ggml_type T>
void multiply_k16(const uint8_t * tile, int64_t nb, int r0, const ActBlock * const * x, float * const * out) {
    using I = typename V::I;
    using F = typename V::F;
    constexpr bool   Q2 = T == GGML_TYPE_Q2_K, Q3 = T == GGML_TYPE_Q3_K, Q6 = T == GGML_TYPE_Q6_K;
    constexpr size_t kTile = Q6 ? kQ6KTile : (Q3 ? kQ3KTile : kQ2KTile);
    constexpr int    kOffsetShift = Q6 ? 5 : 2;  // the weights are q - 32 (Q6_K), q - 4 (Q3_K)
    const uint8_t *  dgroup = tile + nb * kTile;  // Q6_K's and Q3_K's d
    F                res[NT];
    std::fill(res, res + NT, V::fzero());
    for (int64_t b = 0; b < nb; ++b, tile += kTile) {
        I acc[NT], offs[NT];  // offs: the sums of sc * x (Q6_K, Q3_K) or m * x (Q2_K)
        std::fill(acc, acc + NT, V::zero());
        std::fill(offs, offs + NT, V::zero());
        for (int h = 0; h < 8; ++h) {
            I               scw, offw, w[8];
            const uint8_t * qs;
            if constexpr (Q6) {
                scw = offw = V::s8_16(q6_K_scales(tile, h) + 2 * r0);
                qs         = q6_K_qh(tile, h);
                prefetch(qs + kQ6KPrefetch, 6);
                const I low4 = V::set8(0x0F), bits45 = V::set8(0x30);
                LVGG_UNROLL
                for (int s = 0; s < 2; ++s) {  // as unpack_nibbles, with the high 2 bits merged in
                    const I hb = V::load(qs + 64 * s + 4 * r0);
                    const I w0 = V::load(qs + 128 + 128 * s + 4 * r0);
                    const I w1 = V::load(qs + 128 + 128 * s + 64 + 4 * r0);
                    w[2 * s]     = V::and_or(w0, low4, V::and_(V::template slli16<4>(hb), bits45));  // load 2s, low
                    w[2 * s + 4] = V::and_or(V::template srli16<4>(w0), low4,
                                             V::and_(V::template slli16<2>(hb), bits45));  // load 2s, high
                    w[2 * s + 1] = V::and_or(w1, low4, V::and_(hb, bits45));           // load 2s + 1, low
                    w[2 * s + 5] = V::and_or(V::template srli16<4>(w1), low4,
                                             V::and_(V::template srli16<2>(hb), bits45));  // load 2s + 1, high
                }
            } else {
                if constexpr (Q3) {
                    scw = offw = V::s8_16(tile + 32 * h + 2 * r0);
                } else {
                    const I sm = V::u8_16(tile + kQ2KSm + 32 * h + 2 * r0);
                    scw        = V::and_(sm, V::set16(0x0F));
                    offw       = V::template srli16<4>(sm);
                }
                qs = tile + (Q3 ? kQ3KQs + h * 192 : kQ2KQs + h * 128);
                prefetch(qs + kQ4KPrefetch, Q3 ? 3 : 2);
                unpack_crumbs<V, Q3>(qs + 4 * r0, w, std::make_integer_sequence<int, 8>());
            }
            // Q2_K's and Q3_K's sums of 16 products fit int16: both sub-blocks' sums as a pair, scaled by
            // VPDPWSSD (Q6_K's do not: two multiplies)
            constexpr bool kPairs = max_weight(T) * 16 * 127 <= 32767;
            const I sc_odd = V::template srai32<16>(scw), sc_even = V::template srai32<16>(V::template slli32<16>(scw));
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {  // sub-block 2h: columns 0..15 of the chunk, 2h + 1: 16..31
                const int8_t * xq = x[n][b].qs + 32 * h;
                const I        q0 = V::template dot16<max_weight(T)>(w, xq);
                const I        q1 = V::template dot16<max_weight(T)>(w + 4, xq + 16);
                if constexpr (kPairs) {
                    acc[n] = V::dpwssd(acc[n], V::pair16(q0, q1), scw);
                } else {
                    acc[n] = V::add(acc[n], V::add(V::mul(q0, sc_even), V::mul(q1, sc_odd)));
                }
                offs[n] = V::dpwssd(offs[n], offw, V::bcast32(x[n][b].bsum16 + 2 * h));
            }
        }
        LVGG_UNROLL
        for (int n = 0; n < NT; ++n) {
            const F dx = V::fset(x[n][b].d);
            if constexpr (Q2) {
                res[n] = V::fmadd(V::cvt(acc[n]), V::fmul(V::f16(tile + 2 * r0), dx), res[n]);
                res[n] = V::fnmadd(V::cvt(offs[n]), V::fmul(V::f16(tile + 32 + 2 * r0), dx), res[n]);
            } else {
                const I q = V::sub(acc[n], V::template slli32<kOffsetShift>(offs[n]));
                res[n]    = V::fmadd(V::cvt(q), V::fmul(V::f16(dgroup + b * kRows * 2 + 2 * r0), dx), res[n]);
            }
        }
    }
    store_rows<V, NT>(out, r0, res);
}

// IQ4_XS: 4-bit codes looked up, a 6-bit scale (minus 32) per 32 values, d after the tiles.
template <class V, int NT>
void multiply_iq4_xs(const uint8_t * tile, int64_t nb, int r0, const ActBlock * const * x, float * const * out) {
    using I = typename V::I;
    using F = typename V::F;
    const I         table  = V::table16(kIQ4NLTable.bytes);
    const uint8_t * dgroup = tile + nb * kIQ4XSTile;
    F               res[NT];
    std::fill(res, res + NT, V::fzero());
    for (int64_t b = 0; b < nb; ++b, tile += kIQ4XSTile) {
        I acc[NT];
        std::fill(acc, acc + NT, V::zero());
        for (int j = 0; j < 8; ++j) {
            const uint8_t * qs = tile + kIQ4XSQs + j * 256;
            prefetch(qs + kQ4KPrefetch, 4);
            I w[8];
            unpack_nibbles<V>(qs + 4 * r0, w);
            look_up<V>(table, w);
            const I scv = V::s8_32(tile + 16 * j + r0);
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {
                const I q = dot32<V, max_weight(GGML_TYPE_IQ4_XS), kLookupOffset>(w, x[n][b].qs + 32 * j,
                                                                                   x[n][b].bsum32[j]);
                acc[n]    = V::add(acc[n], V::mul(q, scv));
            }
        }
        const F d = V::f16(dgroup + b * kRows * 2 + 2 * r0);
        LVGG_UNROLL
        for (int n = 0; n < NT; ++n) {
            res[n] = V::fmadd(V::cvt(acc[n]), V::fmul(d, V::fset(x[n][b].d)), res[n]);
        }
    }
    store_rows<V, NT>(out, r0, res);
}

#    if LVGG_GRID_LOOKUP
LVGG_INLINE __m512i look_up_piece(const uint8_t * table, int q, __m512i low) {
    return _mm512_permutex2var_epi8(_mm512_load_si512(table + 128 * q), low, _mm512_load_si512(table + 128 * q + 64));
}

// Plane `table` of 64 entries at once: the 128-entry pieces by VPERMI2B (the low 7 bits of `low`),
// chosen by bit 7 (m7), bit 8 (h8) and bit 9 (h9) of each index.
template <int Entries>
LVGG_INLINE __m512i look_up_plane(const uint8_t * table, __m512i low, __mmask64 m7, __mmask64 h8, __mmask64 h9) {
    auto piece = [&](int q) __attribute__((always_inline)) { return look_up_piece(table, q, low); };
    __m512i v = _mm512_mask_blend_epi8(m7, piece(0), piece(1));
    if constexpr (Entries >= 512) {
        v = _mm512_mask_blend_epi8(h8, v, _mm512_mask_blend_epi8(m7, piece(2), piece(3)));
    }
    if constexpr (Entries == 1024) {
        const __m512i u = _mm512_mask_blend_epi8(h8, _mm512_mask_blend_epi8(m7, piece(4), piece(5)),
                                                 _mm512_mask_blend_epi8(m7, piece(6), piece(7)));
        v = _mm512_mask_blend_epi8(h9, v, u);
    }
    return v;
}
#    endif

// The weights of an IQ2/IQ3 chunk (pack_group_grid), offset +- grid value, as the grid kernels take
// them: w[u * entry_bytes + p] holds value p of each row's entries of run u (byte 4 r + i: entry i).
template <class V, ggml_type T>
LVGG_INLINE void unpack_grid(const GridCodes & codes, const uint8_t * tile, int h, int r0, typename V::I w[8]) {
    constexpr GridFormat f     = grid_format(T);
    const uint8_t *      high  = tile + f.scale_bytes() + h * f.high_chunk_bytes();
    const uint8_t *      chunk = tile + f.scale_bytes() + f.high_bytes() + h * f.chunk_bytes();
    const uint8_t *      minus = chunk + f.index_bytes();
#    if LVGG_GRID_LOOKUP
    if constexpr (V::kLanes == 16) {
        constexpr int bits = grid_level_bits(T), per_byte = f.entry_bytes / 2;
        const __m512i two_offsets = _mm512_set1_epi8((char) (2 * f.offset));
        const __m512i levels      = _mm512_load_si512(codes.levels);
        LVGG_UNROLL
        for (int u = 0; u < f.runs(); ++u) {
            const __m512i   low = _mm512_load_si512(chunk + 64 * u);
            const __mmask64 m7  = _mm512_movepi8_mask(low);
            const __mmask64 h8  = f.high_bits >= 1 ? u64_at(high + 8 * u * f.high_bits) : 0;
            const __mmask64 h9  = f.high_bits == 2 ? u64_at(high + 8 * u * f.high_bits + 8) : 0;
            const __m512i   code[2] = {look_up_plane<f.grid_entries>(codes.bytes[0], low, m7, h8, h9),
                                       look_up_plane<f.grid_entries>(codes.bytes[1], low, m7, h8, h9)};
            LVGG_UNROLL
            for (int p = 0; p < f.entry_bytes; ++p) {
                // VPERMB reads the low 6 bits: the bits above the level (the next ones) pick a copy
                const __m512i t = _mm512_permutexvar_epi8(_mm512_srli_epi16(code[p / per_byte], bits * (p % per_byte)), levels);
                w[u * f.entry_bytes + p] =
                    _mm512_mask_sub_epi8(t, u64_at(minus + 8 * (u * f.entry_bytes + p)), two_offsets, t);
            }
        }
        return;
    }
#    endif
    // The same registers byte by byte, for a kernel set that runs matrices the VBMI set packed (the
    // others do not pack these types: ggml's kernels run them there).
    alignas(64) uint8_t bytes[8][64];
    for (int u = 0; u < f.runs(); ++u) {
        for (int r = 0; r < V::kLanes; ++r) {
            for (int i = 0; i < 4; ++i) {
                const int at = 4 * (r0 + r) + i;
                int       e  = chunk[64 * u + at];
                for (int bit = 0; bit < f.high_bits; ++bit) {
                    e |= (int) ((u64_at(high + 8 * (u * f.high_bits + bit)) >> at) & 1) << (8 + bit);
                }
                for (int p = 0; p < f.entry_bytes; ++p) {
                    const int t = ((const uint8_t *) f.grid)[e * f.entry_bytes + p] + f.offset;
                    const int k = u * f.entry_bytes + p;
                    bytes[k][4 * r + i] = (uint8_t) ((u64_at(minus + 8 * k) >> at) & 1 ? 2 * f.offset - t : t);
                }
            }
        }
    }
    for (int k = 0; k < 8; ++k) {
        w[k] = V::load(bytes[k]);
    }
}

// IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: weights from grid lookups (unpack_grid), a 4-bit scale s per
// 32 or 16 values (2 s + 1 multiplies the integer sums), d after the tiles. w[k] multiplies the
// activations 4k..4k+3 of the chunk (ActOrder::kGrid16/kGrid32); with a scale per 16 (IQ2_XS,
// IQ2_S) entries 0, 1 of a lane are the chunk's first 16 columns, 2, 3 the others.
template <class V, int NT, ggml_type T>
void multiply_grid(const uint8_t * tile, int64_t nb, int r0, const ActBlock * const * x, float * const * out) {
    using I                     = typename V::I;
    using F                     = typename V::F;
    constexpr GridFormat f      = grid_format(T);
    constexpr int        MaxW   = max_weight(T);
    const GridCodes &    codes  = grid_codes<T>();
    const uint8_t *      dgroup = tile + nb * f.tile_bytes();
    const I              low4 = V::set32(15), one = V::set32(1);
    F                    res[NT];
    std::fill(res, res + NT, V::fzero());
    for (int64_t b = 0; b < nb; ++b, tile += f.tile_bytes()) {
        I acc[NT];
        std::fill(acc, acc + NT, V::zero());
        for (int h = 0; h < 8; ++h) {
            prefetch(tile + f.scale_bytes() + f.high_bytes() + h * f.chunk_bytes() + kQ4KPrefetch,
                     (int) (f.chunk_bytes() / 64));
            I w[8];
            unpack_grid<V, T>(codes, tile, h, r0, w);
            if constexpr (f.scales16) {
                const I s   = V::u8_32(tile + 16 * h + r0);
                const I sc0 = V::add(V::template slli32<1>(V::and_(s, low4)), one);
                const I sc1 = V::add(V::template slli32<1>(V::shr32(s, 4)), one);
                LVGG_UNROLL
                for (int n = 0; n < NT; ++n) {
                    const int8_t * xq = x[n][b].qs + 32 * h;
                    I              q0 = V::zero(), q1 = V::zero();
                    LVGG_UNROLL
                    for (int k = 0; k < 8; ++k) {  // activations 4k, 4k + 1 (entries 0, 1), then 4k + 2, 4k + 3
                        q0 = V::dot4(q0, w[k], V::bcast16_low(xq + 4 * k));
                        q1 = V::dot4(q1, w[k], V::bcast16_high(xq + 4 * k + 2));
                    }
                    q0     = V::sub(q0, V::set32(f.offset * x[n][b].bsum16[2 * h]));
                    q1     = V::sub(q1, V::set32(f.offset * x[n][b].bsum16[2 * h + 1]));
                    acc[n] = V::add(acc[n], V::add(V::mul(q0, sc0), V::mul(q1, sc1)));
                }
            } else {
                const I s  = V::and_(V::shr32(V::u8_32(tile + 16 * (h / 2) + r0), 4 * (h % 2)), low4);
                const I sc = V::add(V::template slli32<1>(s), one);
                LVGG_UNROLL
                for (int n = 0; n < NT; ++n) {
                    const I q = dot32<V, MaxW, f.offset>(w, x[n][b].qs + 32 * h, x[n][b].bsum32[h]);
                    acc[n]    = V::add(acc[n], V::mul(q, sc));
                }
            }
        }
        const F d = V::fmul(V::f16(dgroup + b * kRows * 2 + 2 * r0), V::fset(f.factor));
        LVGG_UNROLL
        for (int n = 0; n < NT; ++n) {
            res[n] = V::fmadd(V::cvt(acc[n]), V::fmul(d, V::fset(x[n][b].d)), res[n]);
        }
    }
    store_rows<V, NT>(out, r0, res);
}

// Types of 32-value blocks with one scale each (Format32); w[k] holds columns 4k..4k+3 of a block
// (unsigned: Q8_0's weight + 128, Q4_0's 4-bit q, the others' values + their offset; the weights
// are those minus the format's offset).
template <class V, int NT, ggml_type T>
void multiply_32(const uint8_t * tile, int64_t n32, int r0, const ActBlock * const * x, float * const * out) {
    using I              = typename V::I;
    using F              = typename V::F;
    constexpr Format32 f = format32(T);
    I                  table = V::zero();
    if constexpr (f.values != nullptr) {
        table = V::table16(T == GGML_TYPE_MXFP4 ? kMXFP4Table.bytes : kIQ4NLTable.bytes);
    }
    F res[NT];
    std::fill(res, res + NT, V::fzero());
    for (int64_t b = 0; b < (n32 + 7) / 8; ++b, tile += f.tile_bytes()) {
        const int blocks = (int) std::min<int64_t>(8, n32 - b * 8);
        for (int j = 0; j < blocks; ++j) {
            const uint8_t * unit = tile + (j / f.blocks) * f.unit_bytes();
            const uint8_t * qs   = unit + 64 + (j % f.blocks) * f.qs_bytes();
            prefetch(qs + kQ4KPrefetch, (int) (f.qs_bytes() / 64));
            I w[8];
            if constexpr (f.bits == 4) {
                unpack_nibbles<V>(qs + 4 * r0, w);
                if constexpr (f.values != nullptr) {
                    look_up<V>(table, w);
                }
            } else {
                LVGG_UNROLL
                for (int k = 0; k < 8; ++k) {
                    w[k] = V::load(qs + 64 * k + 4 * r0);
                }
            }
            const uint8_t * scales = unit + (j % f.blocks) * kRows * f.scale_bytes + f.scale_bytes * r0;
            const F         d      = f.scale_bytes == 2 ? V::f16(scales) : V::e8m0_half(scales);
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {
                const I q = dot32<V, max_weight(T), f.offset>(w, x[n][b].qs + 32 * j, x[n][b].bsum32[j]);
                res[n]    = V::fmadd(V::cvt(q), V::fmul(d, V::fset(x[n][b].d32[j])), res[n]);
            }
        }
    }
    store_rows<V, NT>(out, r0, res);
}

template <class V, int NT>
void multiply_rows(ggml_type type, const uint8_t * group, int64_t cols, int r0, const ActBlock * const * x,
                   float * const * out) {
    const int64_t nb = cols / kBlock, n32 = cols / 32;
    switch (type) {
        case GGML_TYPE_Q2_K: multiply_k16<V, NT, GGML_TYPE_Q2_K>(group, nb, r0, x, out); break;
        case GGML_TYPE_Q3_K: multiply_k16<V, NT, GGML_TYPE_Q3_K>(group, nb, r0, x, out); break;
        case GGML_TYPE_Q4_K: multiply_q45_K<V, NT, false>(group, nb, r0, x, out); break;
        case GGML_TYPE_Q5_K: multiply_q45_K<V, NT, true>(group, nb, r0, x, out); break;
        case GGML_TYPE_Q6_K: multiply_k16<V, NT, GGML_TYPE_Q6_K>(group, nb, r0, x, out); break;
        case GGML_TYPE_IQ4_XS: multiply_iq4_xs<V, NT>(group, nb, r0, x, out); break;
        case GGML_TYPE_IQ2_XXS: multiply_grid<V, NT, GGML_TYPE_IQ2_XXS>(group, nb, r0, x, out); break;
        case GGML_TYPE_IQ2_XS: multiply_grid<V, NT, GGML_TYPE_IQ2_XS>(group, nb, r0, x, out); break;
        case GGML_TYPE_IQ2_S: multiply_grid<V, NT, GGML_TYPE_IQ2_S>(group, nb, r0, x, out); break;
        case GGML_TYPE_IQ3_XXS: multiply_grid<V, NT, GGML_TYPE_IQ3_XXS>(group, nb, r0, x, out); break;
        case GGML_TYPE_IQ3_S: multiply_grid<V, NT, GGML_TYPE_IQ3_S>(group, nb, r0, x, out); break;
        case GGML_TYPE_Q4_0: multiply_32<V, NT, GGML_TYPE_Q4_0>(group, n32, r0, x, out); break;
        case GGML_TYPE_IQ4_NL: multiply_32<V, NT, GGML_TYPE_IQ4_NL>(group, n32, r0, x, out); break;
        case GGML_TYPE_MXFP4: multiply_32<V, NT, GGML_TYPE_MXFP4>(group, n32, r0, x, out); break;
        default: multiply_32<V, NT, GGML_TYPE_Q8_0>(group, n32, r0, x, out); break;
    }
}

// One row group, on all its rows (AVX-512) or on each half (AVX2).
template <class V, int NT>
void multiply_tile(ggml_type type, const uint8_t * group, int64_t cols, const ActBlock * const * x,
                   float * const * out) {
    for (int r0 = 0; r0 < kRows; r0 += V::kLanes) {
        multiply_rows<V, NT>(type, group, cols, r0, x, out);
    }
}

#endif  // LVGG_KERNELS

}  // namespace

enum Kernels { kNone, kAvx2, kVnni };

std::atomic<int> g_kernels{LVGG_VNNI ? kVnni : (LVGG_AVX2 ? kAvx2 : kNone)};

std::vector<std::string> kernel_sets() {
    std::vector<std::string> sets;
    if (LVGG_VNNI) {
        sets.push_back("avx512_vnni");
    }
    if (LVGG_AVX2) {
        sets.push_back("avx2");
    }
    return sets;
}

bool use_kernels(const std::string & name) {
    for (const std::string & set : kernel_sets()) {
        if (set == name) {
            g_kernels = name == "avx2" ? kAvx2 : kVnni;
            return true;
        }
    }
    return false;
}

std::string kernels_in_use() {
    switch (g_kernels.load()) {
        case kVnni: return "avx512_vnni";
        case kAvx2: return "avx2";
        default: return "";
    }
}

bool available() { return g_kernels != kNone; }

bool layout_fits(ggml_type type, int64_t rows, int64_t cols) {
    static const bool sizes_match = ggml_type_size(GGML_TYPE_Q2_K) == kQ2KBytes &&
                                    ggml_type_size(GGML_TYPE_Q3_K) == kQ3KBytes &&
                                    ggml_type_size(GGML_TYPE_Q4_K) == kQ4KBytes &&
                                    ggml_type_size(GGML_TYPE_Q5_K) == kQ5KBytes &&
                                    ggml_type_size(GGML_TYPE_Q6_K) == kQ6KBytes &&
                                    ggml_type_size(GGML_TYPE_IQ4_XS) == kIQ4XSBytes &&
                                    ggml_type_size(GGML_TYPE_Q8_0) == format32(GGML_TYPE_Q8_0).block_bytes() &&
                                    ggml_type_size(GGML_TYPE_Q4_0) == format32(GGML_TYPE_Q4_0).block_bytes() &&
                                    ggml_type_size(GGML_TYPE_IQ4_NL) == format32(GGML_TYPE_IQ4_NL).block_bytes() &&
                                    ggml_type_size(GGML_TYPE_MXFP4) == format32(GGML_TYPE_MXFP4).block_bytes();
    static const bool grids_fit = grid_codes<GGML_TYPE_IQ2_XXS>().valid && grid_codes<GGML_TYPE_IQ2_XS>().valid &&
                                  grid_codes<GGML_TYPE_IQ2_S>().valid && grid_codes<GGML_TYPE_IQ3_XXS>().valid &&
                                  grid_codes<GGML_TYPE_IQ3_S>().valid;
    const bool known = has_32_blocks(type) || type == GGML_TYPE_Q2_K || type == GGML_TYPE_Q3_K ||
                       type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q5_K || type == GGML_TYPE_Q6_K ||
                       type == GGML_TYPE_IQ4_XS || (is_grid_type(type) && grids_fit);
    return known && sizes_match && rows > 0 && rows % kRows == 0 && cols > 0 &&
           cols % (has_32_blocks(type) ? 32 : kBlock) == 0;
}

bool packable(ggml_type type, int64_t rows, int64_t cols) {
    // the grid types only where VPERMI2B looks their grids up (elsewhere ggml's kernels were faster)
    return layout_fits(type, rows, cols) && available() && (!is_grid_type(type) || (LVGG_GRID_LOOKUP && g_kernels == kVnni));
}

size_t group_offset(ggml_type type, int64_t cols, int64_t g) { return g * group_bytes(type, cols); }

size_t packed_size(ggml_type type, int64_t rows, int64_t cols) { return (rows / kRows) * group_bytes(type, cols); }

void pack(ggml_type type, const void * src, size_t src_stride, int64_t rows, int64_t cols, int64_t n_matrices,
          void * dst, size_t dst_stride, int n_threads) {
    const size_t  row_bytes = ggml_row_size(type, cols);
    const int64_t nb = cols / kBlock, n32 = cols / 32, groups = rows / kRows, units = n_matrices * groups;
    auto          work       = [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t   e = u / groups, g = u % groups;
            const uint8_t * s = (const uint8_t *) src + e * src_stride + g * kRows * row_bytes;
            uint8_t *       d = (uint8_t *) dst + e * dst_stride + group_offset(type, cols, g);
            switch (type) {
                case GGML_TYPE_Q2_K: pack_group_q23_K<false>(s, row_bytes, nb, d); break;
                case GGML_TYPE_Q3_K: pack_group_q23_K<true>(s, row_bytes, nb, d); break;
                case GGML_TYPE_Q4_K: pack_group_q45_K<false>(s, row_bytes, nb, d); break;
                case GGML_TYPE_Q5_K: pack_group_q45_K<true>(s, row_bytes, nb, d); break;
                case GGML_TYPE_Q6_K: pack_group_q6_K(s, row_bytes, nb, d); break;
                case GGML_TYPE_IQ4_XS: pack_group_iq4_xs(s, row_bytes, nb, d); break;
                case GGML_TYPE_IQ2_XXS: pack_group_grid<GGML_TYPE_IQ2_XXS>(s, row_bytes, nb, d); break;
                case GGML_TYPE_IQ2_XS: pack_group_grid<GGML_TYPE_IQ2_XS>(s, row_bytes, nb, d); break;
                case GGML_TYPE_IQ2_S: pack_group_grid<GGML_TYPE_IQ2_S>(s, row_bytes, nb, d); break;
                case GGML_TYPE_IQ3_XXS: pack_group_grid<GGML_TYPE_IQ3_XXS>(s, row_bytes, nb, d); break;
                case GGML_TYPE_IQ3_S: pack_group_grid<GGML_TYPE_IQ3_S>(s, row_bytes, nb, d); break;
                case GGML_TYPE_Q4_0: pack_group_32<GGML_TYPE_Q4_0>(s, row_bytes, n32, d); break;
                case GGML_TYPE_IQ4_NL: pack_group_32<GGML_TYPE_IQ4_NL>(s, row_bytes, n32, d); break;
                case GGML_TYPE_MXFP4: pack_group_32<GGML_TYPE_MXFP4>(s, row_bytes, n32, d); break;
                default: pack_group_32<GGML_TYPE_Q8_0>(s, row_bytes, n32, d); break;
            }
        }
    };
    n_threads = (int) std::max<int64_t>(1, std::min<int64_t>(n_threads, units));
    std::vector<std::thread> threads;
    for (int i = 1; i < n_threads; ++i) {
        threads.emplace_back(work, units * i / n_threads, units * (i + 1) / n_threads);
    }
    work(0, units / n_threads);
    for (auto & t : threads) {
        t.join();
    }
}

ActOrder act_order(ggml_type weight_type) {
    if (is_grid_type(weight_type)) {
        return grid_format(weight_type).entry_bytes == 4 ? ActOrder::kGrid16 : ActOrder::kGrid32;
    }
    return has_32_blocks(weight_type) ? ActOrder::kPer32 : ActOrder::kPer256;
}

int64_t act_blocks(int64_t cols) { return (cols + kBlock - 1) / kBlock; }

namespace {

// The largest |value| of 32.
float abs_max32(const float * v) {
#if LVGG_VNNI
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v)), _mm512_abs_ps(_mm512_loadu_ps(v + 16))));
#else
    float m = 0.0f;
    for (int i = 0; i < 32; ++i) {
        m = std::max(m, std::fabs(v[i]));
    }
    return m;
#endif
}

// 16 values times `scale`, rounded to nearest even into q (|v * scale| <= 127: never leaves int8);
// returns their sum.
int16_t quantize16(const float * v, float scale, int8_t * q) {
#if LVGG_VNNI
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v), _mm512_set1_ps(scale)));
    _mm_storeu_si128((__m128i *) q, _mm512_cvtsepi32_epi8(r));
    return (int16_t) _mm512_reduce_add_epi32(r);
#else
    int sum = 0;
    for (int i = 0; i < 16; ++i) {
        q[i] = (int8_t) std::clamp((int) std::nearbyint(v[i] * scale), -128, 127);
        sum += q[i];
    }
    return (int16_t) sum;
#endif
}

}  // namespace

void quantize_row(const void * x, ggml_type x_type, int64_t cols, ActBlock * out, ActOrder order) {
    const bool per_32 = order == ActOrder::kPer32;
    float buf[kBlock];
    for (int64_t b = 0; b < act_blocks(cols); ++b) {
        const int64_t n = std::min(kBlock, cols - b * kBlock);  // a last block of fewer values: zeros after
        const float * v = buf;
        std::fill(buf + n, buf + kBlock, 0.0f);
        if (x_type == GGML_TYPE_F32 && n == kBlock) {
            v = (const float *) x + b * kBlock;
        } else if (x_type == GGML_TYPE_F32) {
            std::memcpy(buf, (const float *) x + b * kBlock, n * sizeof(float));
        } else if (x_type == GGML_TYPE_F16) {
            ggml_fp16_to_fp32_row((const ggml_fp16_t *) x + b * kBlock, buf, n);
        } else {
            ggml_bf16_to_fp32_row((const ggml_bf16_t *) x + b * kBlock, buf, n);
        }
        ActBlock & o = out[b];
        float      whole = 0.0f, m32[8];
        for (int j = 0; j < 8; ++j) {
            m32[j]   = abs_max32(v + 32 * j);
            o.d32[j] = m32[j] / 127.0f;
            whole    = std::max(whole, m32[j]);
        }
        o.d = whole / 127.0f;
        for (int s = 0; s < 16; ++s) {
            const float m = per_32 ? m32[s / 2] : whole;
            o.bsum16[s]   = quantize16(v + 16 * s, m > 0.0f ? 127.0f / m : 0.0f, o.qs + 16 * s);
        }
        for (int j = 0; j < 8; ++j) {
            o.bsum32[j] = (int16_t) (o.bsum16[2 * j] + o.bsum16[2 * j + 1]);
        }
        if (order == ActOrder::kGrid16 || order == ActOrder::kGrid32) {
            const int run = order == ActOrder::kGrid16 ? 16 : 32, per = run / 4;  // values per grid entry
            int8_t    q[256];
            std::memcpy(q, o.qs, sizeof(q));
            for (int c = 0; c < 256; c += run) {
                for (int i = 0; i < 4; ++i) {
                    for (int p = 0; p < per; ++p) {
                        o.qs[c + 4 * p + i] = q[c + per * i + p];
                    }
                }
            }
        }
    }
}

#if LVGG_KERNELS
namespace {

template <class V>
void multiply_group_with(ggml_type type, const uint8_t * group, int64_t cols, const ActBlock * const * x, int n_tokens,
                         float * const * out) {
    switch (n_tokens) {
        case 1: multiply_tile<V, 1>(type, group, cols, x, out); break;
        case 2: multiply_tile<V, 2>(type, group, cols, x, out); break;
        case 3: multiply_tile<V, 3>(type, group, cols, x, out); break;
        default: multiply_tile<V, 4>(type, group, cols, x, out); break;
    }
}

}  // namespace
#endif

void multiply_group(ggml_type type, const uint8_t * group, int64_t cols, const ActBlock * const * x, int n_tokens,
                    float * const * out) {
#if LVGG_VNNI
    if (g_kernels == kVnni) {
        multiply_group_with<Vnni>(type, group, cols, x, n_tokens, out);
        return;
    }
#endif
#if LVGG_AVX2
    multiply_group_with<Avx2>(type, group, cols, x, n_tokens, out);
#else
    (void) type, (void) group, (void) cols, (void) x, (void) n_tokens, (void) out;
#endif
}

}  // namespace lvgg::vnni
