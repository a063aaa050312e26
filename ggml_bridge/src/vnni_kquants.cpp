#include "vnni_kquants.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#    define LVGG_VNNI 1
#    include <immintrin.h>
// The kernels keep their per-token accumulators and unpacked weights in registers only when
// every small loop is unrolled (GCC -O3 left them on the stack otherwise: a 30B-A3B Q4_K layer
// took 1.5x as long at 8 tokens and 1.6x at 512).
#    define LVGG_UNROLL _Pragma("GCC unroll 8")
#else
#    define LVGG_VNNI 0
#endif

namespace lvgg::vnni {

namespace {

constexpr int64_t kBlock = 256;

// ggml's block layouts (ggml-common.h), by offset.
constexpr size_t kQ4KBytes = 144;  // d, dmin (fp16), scales[12] (6-bit sc and m), qs[128]
constexpr size_t kQ6KBytes = 210;  // ql[128], qh[64], scales[16] (int8), d (fp16)
constexpr size_t kQ80Bytes = 34;   // d (fp16), qs[32] (int8)
constexpr size_t kQ40Bytes = 18;   // d (fp16), qs[16] (4-bit: columns l and l + 16 of byte l)

// Packed tile sizes and offsets (see the header).
constexpr size_t kQ4KTile = 2368, kQ4KSc = 64, kQ4KM = 192, kQ4KQs = 320;
// Q6_K: runs of two 32-column chunks: sc pairs of both (64 bytes), then per chunk qh (128), ql (256).
constexpr size_t kQ6KTile = 3328, kQ6KRun = 832;
// Q8_0: per 256 columns, four pairs of 32-column blocks: d of both (64 bytes), then qs of each (512).
constexpr size_t kQ80Tile = 4352, kQ80Pair = 1088;
// Q4_0: per 256 columns, four pairs of 32-column blocks: d of both (64 bytes), then qs of each (256).
constexpr size_t kQ40Tile = 2304, kQ40Pair = 576;

// Software prefetch distances (bytes ahead of the weights being read). Measured on the reference
// Xeon (16 threads, 30B-A3B Q4_K layer at 1 token): 0.351 ms without, 0.257 with 1024, 0.247
// with 2048 (ggml's kernels 0.569 / 0.358 / 0.333 in the same runs); Q6_K about the same with 0
// or 2048 and with 1024. On the 2-core EPYC one core streamed Q6_K from cold memory at 13.8 GB/s
// without, 16.0 with 1024 (means of 4 runs); Q4_K there was within noise either way. Q8_0 and
// Q4_0 use Q4_K's distance (not measured on their own).
constexpr size_t kQ4KPrefetch = 2048;
constexpr size_t kQ6KPrefetch = 1024;

const uint8_t * q6_K_scales(const uint8_t * tile, int h) { return tile + (h / 2) * kQ6KRun + 32 * (h % 2); }
const uint8_t * q6_K_qh(const uint8_t * tile, int h) { return tile + (h / 2) * kQ6KRun + 64 + 384 * (h % 2); }

size_t round64(size_t n) { return (n + 63) & ~size_t(63); }

bool has_32_blocks(ggml_type type) { return type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0; }

// Q8_0 and Q4_0 rows may end inside a tile: the last tile keeps only the pairs it uses (an odd
// last block's pair partner has d = 0 and is never read by the kernel).
size_t group_bytes(ggml_type type, int64_t cols) {
    const size_t nb = cols / kBlock, tail_pairs = (cols % kBlock / 32 + 1) / 2;
    switch (type) {
        case GGML_TYPE_Q4_K: return nb * kQ4KTile;
        case GGML_TYPE_Q6_K: return nb * kQ6KTile + round64(nb * kRows * 2);
        case GGML_TYPE_Q4_0: return nb * kQ40Tile + tail_pairs * kQ40Pair;
        default: return nb * kQ80Tile + tail_pairs * kQ80Pair;
    }
}

// One Q4_K block: 4-bit weights, 6-bit scales and mins.
void decode_q4_K(const uint8_t * blk, uint8_t q[256], uint8_t sc[8], uint8_t m[8]) {
    const uint8_t * s  = blk + 4;
    const uint8_t * qs = blk + 16;
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            sc[j] = s[j] & 63;
            m[j]  = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m[j]  = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    for (int c = 0; c < 4; ++c) {  // 64 weights per 32 bytes: low nibbles first
        for (int l = 0; l < 32; ++l) {
            q[64 * c + l]      = qs[32 * c + l] & 0xF;
            q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
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

// Weights of columns c0 + 4i + p (low nibble) and c0 + 16 + 4i + p (high nibble), i < 4, of 16
// rows: 4 loads of 64 bytes (the qs / ql part of a tile for one 32-column sub-block).
void pack_nibbles(uint8_t q[kRows][256], int c0, uint8_t * dst) {
    for (int i = 0; i < 4; ++i) {
        for (int r = 0; r < kRows; ++r) {
            for (int p = 0; p < 4; ++p) {
                dst[(i * kRows + r) * 4 + p] = (q[r][c0 + 4 * i + p] & 0xF) | ((q[r][c0 + 16 + 4 * i + p] & 0xF) << 4);
            }
        }
    }
}

void pack_group_q4_K(const uint8_t * src, size_t row_bytes, int64_t nb, uint8_t * dst) {
    uint8_t q[kRows][256], sc[kRows][8], m[kRows][8];
    for (int64_t b = 0; b < nb; ++b, dst += kQ4KTile) {
        for (int r = 0; r < kRows; ++r) {
            const uint8_t * blk = src + r * row_bytes + b * kQ4KBytes;
            decode_q4_K(blk, q[r], sc[r], m[r]);
            std::memcpy(dst + 2 * r, blk, 2);            // d
            std::memcpy(dst + 32 + 2 * r, blk + 2, 2);   // dmin
        }
        for (int j = 0; j < 8; ++j) {
            for (int r = 0; r < kRows; ++r) {
                dst[kQ4KSc + j * kRows + r]                   = sc[r][j];
                dst[kQ4KM + ((j / 2) * kRows + r) * 2 + j % 2] = m[r][j];
            }
            pack_nibbles(q, 32 * j, dst + kQ4KQs + j * 256);
        }
    }
}

void pack_group_q6_K(const uint8_t * src, size_t row_bytes, int64_t nb, uint8_t * dst) {
    uint8_t  q[kRows][256];
    int8_t   sc[kRows][16];
    uint8_t * d = dst + nb * kQ6KTile;
    std::memset(d + nb * kRows * 2, 0, round64(nb * kRows * 2) - nb * kRows * 2);  // the padding: no stale bytes
    for (int64_t b = 0; b < nb; ++b, dst += kQ6KTile) {
        for (int r = 0; r < kRows; ++r) {
            const uint8_t * blk = src + r * row_bytes + b * kQ6KBytes;
            decode_q6_K(blk, q[r], sc[r]);
            std::memcpy(d + (b * kRows + r) * 2, blk + 208, 2);
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

// Q8_0 and Q4_0 (multiply_32's layout): per 32-column block j, the rows' d into its pair, and
// the weights as unsigned bytes (Q8_0: w + 128, for VPDPBUSD; the kernel takes 128 * sum(x) back)
// or nibbles (Q4_0's q, laid out by pack_nibbles).
// n32: the row's 32-column blocks; an odd last one's pair partner gets d = 0 and zero weights.
template <bool Q4> void pack_group_32(const uint8_t * src, size_t row_bytes, int64_t n32, uint8_t * dst) {
    constexpr size_t kTile = Q4 ? kQ40Tile : kQ80Tile, kPair = Q4 ? kQ40Pair : kQ80Pair, kQs = Q4 ? 256 : 512;
    constexpr size_t kBytes = Q4 ? kQ40Bytes : kQ80Bytes;
    uint8_t          q[kRows][256];
    uint8_t          zero[kBytes] = {};
    if (Q4) {
        std::memset(zero + 2, 0x88, 16);  // q = 8: weight 0
    }
    for (int64_t b = 0; b < (n32 + 7) / 8; ++b, dst += kTile) {
        const int blocks = (int) std::min<int64_t>(8, n32 - b * 8);
        for (int j = 0; j < blocks + blocks % 2; ++j) {  // an odd last block's pair partner too
            uint8_t * pair = dst + (j / 2) * kPair;
            uint8_t * qs   = pair + 64 + (j % 2) * kQs;
            for (int r = 0; r < kRows; ++r) {
                const uint8_t * blk = b * 8 + j < n32 ? src + r * row_bytes + (b * 8 + j) * kBytes : zero;
                std::memcpy(pair + 32 * (j % 2) + 2 * r, blk, 2);
                for (int l = 0; l < (Q4 ? 16 : 32); ++l) {
                    if (Q4) {
                        q[r][32 * j + l]      = blk[2 + l] & 0xF;
                        q[r][32 * j + 16 + l] = blk[2 + l] >> 4;
                    } else {  // load l / 4, row r, byte l % 4
                        qs[((l / 4) * kRows + r) * 4 + l % 4] = blk[2 + l] ^ 0x80;
                    }
                }
            }
            if (Q4) {
                pack_nibbles(q, 32 * j, qs);
            }
        }
    }
}

#if LVGG_VNNI

inline __m512i bcast32(const int8_t * p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

inline __m512i bcast32(const int16_t * p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

#    define LVGG_INLINE inline __attribute__((always_inline))

LVGG_INLINE void prefetch(const uint8_t * p, int lines) {
    LVGG_UNROLL
    for (int l = 0; l < lines; ++l) {
        _mm_prefetch((const char *) p + 64 * l, _MM_HINT_T0);
    }
}

// Four 64-byte loads of packed nibbles (pack_nibbles): w[i] = the low nibbles, columns 4i..4i+3 of
// 16 rows; w[4 + i] = the high ones, columns 16 + 4i...
LVGG_INLINE void unpack_nibbles(const uint8_t * qs, __m512i w[8]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    LVGG_UNROLL
    for (int i = 0; i < 4; ++i) {
        const __m512i v = _mm512_load_si512((const __m512i *) (qs + 64 * i));
        w[i]            = _mm512_and_si512(v, low4);
        w[i + 4]        = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
}

// 16 rows times 16 activations: w[i] holds columns 4i..4i+3 of each row.
LVGG_INLINE __m512i dot16(const __m512i * w, const int8_t * xq) {
    __m512i d = _mm512_setzero_si512();
    LVGG_UNROLL
    for (int i = 0; i < 4; ++i) {
        d = _mm512_dpbusd_epi32(d, w[i], bcast32(xq + 4 * i));
    }
    return d;
}

// 32 columns, as two independent chains.
LVGG_INLINE __m512i dot32(const __m512i * w, const int8_t * xq) {
    return _mm512_add_epi32(dot16(w, xq), dot16(w + 4, xq + 16));
}

template <int NT> LVGG_INLINE void store_rows(float * const * out, const __m512 * res) {
    LVGG_UNROLL
    for (int n = 0; n < NT; ++n) {
        _mm512_storeu_ps(out[n], res[n]);
    }
}

template <int NT>
void multiply_q4_K(const uint8_t * tile, int64_t nb, const ActBlock * const * x, float * const * out) {
    __m512 res[NT] = {};
    for (int64_t b = 0; b < nb; ++b, tile += kQ4KTile) {
        __m512i acc[NT] = {}, mins[NT] = {};
        LVGG_UNROLL
        for (int p = 0; p < 4; ++p) {
            const __m512i mv = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *) (tile + kQ4KM + 32 * p)));
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {
                mins[n] = _mm512_dpwssd_epi32(mins[n], mv, bcast32(x[n][b].bsum32 + 2 * p));
            }
        }
        for (int j = 0; j < 8; ++j) {
            const uint8_t * qs = tile + kQ4KQs + j * 256;
            prefetch(qs + kQ4KPrefetch, 4);
            __m512i w[8];
            unpack_nibbles(qs, w);
            const __m512i scv = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *) (tile + kQ4KSc + 16 * j)));
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {
                acc[n] = _mm512_add_epi32(acc[n], _mm512_mullo_epi32(dot32(w, x[n][b].qs + 32 * j), scv));
            }
        }
        const __m512 d    = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) tile));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) (tile + 32)));
        LVGG_UNROLL
        for (int n = 0; n < NT; ++n) {
            const __m512 dx = _mm512_set1_ps(x[n][b].d);
            res[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[n]), _mm512_mul_ps(d, dx), res[n]);
            res[n] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins[n]), _mm512_mul_ps(dmin, dx), res[n]);
        }
    }
    store_rows<NT>(out, res);
}

template <int NT>
void multiply_q6_K(const uint8_t * tile, int64_t nb, const ActBlock * const * x, float * const * out) {
    const __m512i   low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
    const uint8_t * dgroup = tile + nb * kQ6KTile;
    __m512          res[NT] = {};
    for (int64_t b = 0; b < nb; ++b, tile += kQ6KTile) {
        __m512i acc[NT] = {}, offs[NT] = {};
        for (int h = 0; h < 8; ++h) {
            const __m512i   scw     = _mm512_cvtepi8_epi16(_mm256_load_si256((const __m256i *) q6_K_scales(tile, h)));
            const __m512i   sc_odd  = _mm512_srai_epi32(scw, 16);
            const __m512i   sc_even = _mm512_srai_epi32(_mm512_slli_epi32(scw, 16), 16);
            const uint8_t * qh      = q6_K_qh(tile, h);
            const uint8_t * ql      = qh + 128;
            prefetch(qh + kQ6KPrefetch, 6);
            __m512i w[8];  // as unpack_nibbles, with the high 2 bits merged in
            LVGG_UNROLL
            for (int s = 0; s < 2; ++s) {
                const __m512i hb = _mm512_load_si512((const __m512i *) (qh + 64 * s));
                const __m512i h0 = _mm512_and_si512(_mm512_slli_epi16(hb, 4), bits45);  // load 2s, low nibble
                const __m512i h1 = _mm512_and_si512(_mm512_slli_epi16(hb, 2), bits45);  // load 2s, high nibble
                const __m512i h2 = _mm512_and_si512(hb, bits45);                         // load 2s+1, low
                const __m512i h3 = _mm512_and_si512(_mm512_srli_epi16(hb, 2), bits45);  // load 2s+1, high
                const __m512i w0 = _mm512_load_si512((const __m512i *) (ql + 128 * s));
                const __m512i w1 = _mm512_load_si512((const __m512i *) (ql + 128 * s + 64));
                // (w & 0x0F) | h: ternary logic 0xEA = (a & b) | c
                w[2 * s]         = _mm512_ternarylogic_epi32(w0, low4, h0, 0xEA);
                w[2 * s + 4]     = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w0, 4), low4, h1, 0xEA);
                w[2 * s + 1]     = _mm512_ternarylogic_epi32(w1, low4, h2, 0xEA);
                w[2 * s + 5]     = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w1, 4), low4, h3, 0xEA);
            }
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {  // sub-block 2h: columns 0..15 of the chunk, 2h + 1: 16..31
                const int8_t * xq = x[n][b].qs + 32 * h;
                acc[n]  = _mm512_add_epi32(acc[n], _mm512_add_epi32(_mm512_mullo_epi32(dot16(w, xq), sc_even),
                                                                    _mm512_mullo_epi32(dot16(w + 4, xq + 16), sc_odd)));
                offs[n] = _mm512_dpwssd_epi32(offs[n], scw, bcast32(x[n][b].bsum16 + 2 * h));
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (dgroup + b * kRows * 2)));
        LVGG_UNROLL
        for (int n = 0; n < NT; ++n) {
            const __m512i q = _mm512_sub_epi32(acc[n], _mm512_slli_epi32(offs[n], 5));  // weights are q - 32
            res[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(d, _mm512_set1_ps(x[n][b].d)), res[n]);
        }
    }
    store_rows<NT>(out, res);
}

// Q8_0 and Q4_0: 32-column blocks with one scale per row; w[k] holds columns 4k..4k+3 of a block
// (unsigned: Q8_0's weight + 128, Q4_0's 4-bit q; the weights are those minus kOffset).
template <int NT, bool Q4>
void multiply_32(const uint8_t * tile, int64_t n32, const ActBlock * const * x, float * const * out) {
    constexpr size_t  kTile = Q4 ? kQ40Tile : kQ80Tile, kPair = Q4 ? kQ40Pair : kQ80Pair, kQs = Q4 ? 256 : 512;
    constexpr int32_t kOffset = Q4 ? 8 : 128;
    __m512            res[NT] = {};
    for (int64_t b = 0; b < (n32 + 7) / 8; ++b, tile += kTile) {
        const int blocks = (int) std::min<int64_t>(8, n32 - b * 8);
        for (int j = 0; j < blocks; ++j) {
            const uint8_t * pair = tile + (j / 2) * kPair;
            const uint8_t * qs   = pair + 64 + (j % 2) * kQs;
            prefetch(qs + kQ4KPrefetch, kQs / 64);
            __m512i w[8];
            if (Q4) {
                unpack_nibbles(qs, w);
            } else {
                LVGG_UNROLL
                for (int k = 0; k < 8; ++k) {
                    w[k] = _mm512_load_si512((const __m512i *) (qs + 64 * k));
                }
            }
            const __m512 d = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) (pair + 32 * (j % 2))));
            LVGG_UNROLL
            for (int n = 0; n < NT; ++n) {
                const __m512i q  = _mm512_sub_epi32(dot32(w, x[n][b].qs + 32 * j),
                                                    _mm512_set1_epi32(kOffset * x[n][b].bsum32[j]));
                const __m512  dx = _mm512_set1_ps(x[n][b].d32[j]);
                res[n]           = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(d, dx), res[n]);
            }
        }
    }
    store_rows<NT>(out, res);
}

template <int NT>
void multiply_tile(ggml_type type, const uint8_t * group, int64_t cols, const ActBlock * const * x,
                   float * const * out) {
    switch (type) {
        case GGML_TYPE_Q4_K: multiply_q4_K<NT>(group, cols / kBlock, x, out); break;
        case GGML_TYPE_Q6_K: multiply_q6_K<NT>(group, cols / kBlock, x, out); break;
        case GGML_TYPE_Q4_0: multiply_32<NT, true>(group, cols / 32, x, out); break;
        default: multiply_32<NT, false>(group, cols / 32, x, out); break;
    }
}

#endif  // LVGG_VNNI

}  // namespace

bool available() { return LVGG_VNNI; }

bool layout_fits(ggml_type type, int64_t rows, int64_t cols) {
    return (type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q6_K || type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0) &&
           rows > 0 && rows % kRows == 0 && cols > 0 && cols % (has_32_blocks(type) ? 32 : kBlock) == 0 &&
           ggml_type_size(GGML_TYPE_Q4_K) == kQ4KBytes && ggml_type_size(GGML_TYPE_Q6_K) == kQ6KBytes &&
           ggml_type_size(GGML_TYPE_Q8_0) == kQ80Bytes && ggml_type_size(GGML_TYPE_Q4_0) == kQ40Bytes;
}

bool packable(ggml_type type, int64_t rows, int64_t cols) { return available() && layout_fits(type, rows, cols); }

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
                case GGML_TYPE_Q4_K: pack_group_q4_K(s, row_bytes, nb, d); break;
                case GGML_TYPE_Q6_K: pack_group_q6_K(s, row_bytes, nb, d); break;
                case GGML_TYPE_Q4_0: pack_group_32<true>(s, row_bytes, n32, d); break;
                default: pack_group_32<false>(s, row_bytes, n32, d); break;
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

bool per_32_scales(ggml_type weight_type) { return has_32_blocks(weight_type); }

int64_t act_blocks(int64_t cols) { return (cols + kBlock - 1) / kBlock; }

void quantize_row(const void * x, ggml_type x_type, int64_t cols, ActBlock * out, bool per_32) {
#if LVGG_VNNI
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
        __m512     amax[8];  // per 32 values
        for (int j = 0; j < 8; ++j) {
            amax[j] = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v + 32 * j)),
                                    _mm512_abs_ps(_mm512_loadu_ps(v + 32 * j + 16)));
        }
        float whole = 0.0f, m32[8];
        for (int j = 0; j < 8; ++j) {
            m32[j]   = _mm512_reduce_max_ps(amax[j]);
            o.d32[j] = m32[j] / 127.0f;
            whole    = std::max(whole, m32[j]);
        }
        o.d = whole / 127.0f;
        for (int s = 0; s < 16; ++s) {  // |v * scale| <= 127: rounding (to nearest even) never leaves int8
            const float   m     = per_32 ? m32[s / 2] : whole;
            const __m512  scale = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
            const __m512i q     = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + 16 * s), scale));
            _mm_storeu_si128((__m128i *) (o.qs + 16 * s), _mm512_cvtsepi32_epi8(q));
            o.bsum16[s] = (int16_t) _mm512_reduce_add_epi32(q);
        }
        for (int j = 0; j < 8; ++j) {
            o.bsum32[j] = (int16_t) (o.bsum16[2 * j] + o.bsum16[2 * j + 1]);
        }
    }
#else
    (void) x, (void) x_type, (void) cols, (void) out, (void) per_32;
#endif
}

void multiply_group(ggml_type type, const uint8_t * group, int64_t cols, const ActBlock * const * x, int n_tokens,
                    float * const * out) {
#if LVGG_VNNI
    switch (n_tokens) {
        case 1: multiply_tile<1>(type, group, cols, x, out); break;
        case 2: multiply_tile<2>(type, group, cols, x, out); break;
        case 3: multiply_tile<3>(type, group, cols, x, out); break;
        default: multiply_tile<4>(type, group, cols, x, out); break;
    }
#else
    (void) type, (void) group, (void) cols, (void) x, (void) n_tokens, (void) out;
#endif
}

}  // namespace lvgg::vnni
