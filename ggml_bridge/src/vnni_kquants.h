// lvgg's own CPU kernels for Q4_K, Q6_K, Q8_0 and Q4_0 experts on AVX-512 VNNI CPUs.
//
// Why: on the reference Xeon ggml's Q4_K kernels (AVX2, 8x8 interleave) reach ~60% of the read
// bandwidth at one token; BF16, with almost no arithmetic per byte, reaches 97%. The work per
// byte is the limit, so these kernels cut it: weights are re-laid out once at load ("packed")
// so that one VPDPBUSD multiplies 4 weights of each of 16 rows by 4 activations broadcast to
// every lane, with no horizontal sums and no scale decoding at run time.
//
// Packed layout of one expert matrix [rows, cols] (rows a multiple of 16, cols of 256; of 32 for
// Q8_0 and Q4_0, whose last tile then keeps only the pairs it uses): row groups of 16 rows, each
// a run of tiles, one tile per 256-column block:
//   Q4_K tile (2368 bytes, 2304 in the file's layout): d[16], dmin[16] (fp16); sc[8][16];
//     m pairs[4][16][2] (the 6-bit scales and mins of sub-blocks 2p, 2p+1 of each row);
//     qs[8][4][16][4]: sub-block j, load i, row r, byte p holds the 4-bit weights of columns
//     32j + 4i + p (low nibble) and 32j + 16 + 4i + p (high nibble).
//   Q6_K tile (3328 bytes) plus d[16] (fp16) per block kept after the group's tiles (together
//     exactly the file's size, up to 64-byte padding per group): four runs of two 32-column
//     chunks h, h+1, each run read front to back: the int8 scale pairs [16][2] of chunk h, then
//     of h+1, then per chunk qh[2][16][4], ql[4][16][4]. ql is laid out like Q4_K's qs (low 4
//     bits); in qh, bits 0-1/2-3 are the high 2 bits of ql load 2s's low/high nibble, bits
//     4-5/6-7 those of load 2s+1.
//   Q8_0 tile (4352 bytes, the file's size): four pairs of 32-column blocks, each d[2][16]
//     (fp16) then qs[2][8][16][4]: block k, load i, row r, byte p holds weight + 128 (unsigned,
//     for VPDPBUSD) of column 32k + 4i + p.
//   Q4_0 tile (2304 bytes, the file's size): like Q8_0's, with qs[2][4][16][4] of 4-bit weights
//     laid out like Q4_K's qs (the kernel takes the -8 offset back with the 32-value sums).
// Activations are quantized per 256 values to int8 with one float scale and the sums of each
// 16 and 32 values (ActBlock), which fold the Q4_K mins, Q6_K's -32 and Q8_0's +128 offsets into
// a few integer operations per row and block.
#pragma once

#include <ggml.h>

#include <cstddef>
#include <cstdint>

namespace lvgg::vnni {

constexpr int64_t kRows = 16;   // rows per group
constexpr int64_t kMaxTile = 4;  // tokens per pass over a row group's weights

struct alignas(64) ActBlock {
    float   d;  // value = d * qs (one scale for the 256 values), or
    int16_t bsum16[16];
    int16_t bsum32[8];
    float   d32[8];  // value = d32[i / 32] * qs[i] (a scale per 32 values; see per_32_scales)
    int8_t  pad[44];
    int8_t  qs[256];
};
static_assert(sizeof(ActBlock) == 384, "ActBlock layout");

// The kernels for weights of this type take activations with a scale per 32 values (Q8_0 and
// Q4_0, as ggml's own kernels do: outliers in a 256-value block then cost less precision).
bool per_32_scales(ggml_type weight_type);

// This build has the kernels (compiled for a CPU with AVX-512 F/BW/VL and VNNI).
bool available();
// A [rows, cols] matrix of `type` has a packed layout (the packers run on any CPU: a GPU reads
// the layout too).
bool layout_fits(ggml_type type, int64_t rows, int64_t cols);
// ... and the kernels are built.
bool packable(ggml_type type, int64_t rows, int64_t cols);
// Bytes of one packed matrix.
size_t packed_size(ggml_type type, int64_t rows, int64_t cols);
// Packs `n_matrices` matrices ([rows, cols], `src_stride` bytes apart in ggml's layout) into
// `dst` (`dst_stride` bytes apart, 64-byte aligned), on `n_threads` threads that inherit the
// caller's CPU affinity and memory policy (pages land where the caller's would). The rows may
// be the first rows of bigger packed matrices (dst at a group_offset of them).
void pack(ggml_type type, const void * src, size_t src_stride, int64_t rows, int64_t cols, int64_t n_matrices,
          void * dst, size_t dst_stride, int n_threads);

// ActBlocks of an activation row of `cols` values (a last block of fewer is padded with zeros).
int64_t act_blocks(int64_t cols);
// Quantizes `cols` (a multiple of 32) values of type f32, f16 or bf16 into act_blocks(cols)
// blocks (symmetric, round to nearest even, like ggml's Q8_K; per 32 values like its Q8_0 with
// per_32).
void quantize_row(const void * x, ggml_type x_type, int64_t cols, ActBlock * out, bool per_32);

// out[n][i] = row (16 g + i) of the packed matrix times activation row x[n], for n < n_tokens
// (1..kMaxTile) and one row group g (`group`: its start, from group_offset()).
void multiply_group(ggml_type type, const uint8_t * group, int64_t cols, const ActBlock * const * x, int n_tokens,
                    float * const * out);
// Byte offset of row group g in a packed matrix.
size_t group_offset(ggml_type type, int64_t cols, int64_t g);

}  // namespace lvgg::vnni
