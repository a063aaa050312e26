// lvgg's own CPU kernels for quantized experts, on AVX-512 VNNI and on AVX2 CPUs: Q2_K, Q3_K, Q4_K,
// Q5_K, Q6_K, IQ4_XS (256-value blocks) and Q8_0, Q4_0, IQ4_NL, MXFP4 (32-value blocks); and on
// AVX-512 VNNI CPUs with VBMI the grid types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S.
//
// Why: on the reference Xeon ggml's Q4_K kernels (AVX2, 8x8 interleave) reach ~60% of the read
// bandwidth at one token, its IQ4_XS, Q3_K, Q2_K and MXFP4 ones 26-34%; BF16, with almost no
// arithmetic per byte, reaches 97%. The work per byte is the limit, so these kernels cut it:
// weights are re-laid out once at load ("packed") so that one VPDPBUSD multiplies 4 weights of each
// of 16 rows by 4 activations broadcast to every lane, with no horizontal sums and no scale decoding
// at run time. AVX2 reads the same layout, 8 rows per register (each half of a group in turn),
// with VPMADDUBSW (and its products summed in int16 while they cannot overflow; weights above 128,
// Q8_0's and IQ4's, through VPSIGNB as ggml does).
//
// Packed layout of one expert matrix [rows, cols] (rows a multiple of 16, cols of 256; of 32 for
// the 32-value block types, whose last tile then keeps only the units it uses): row groups of 16
// rows, each a run of tiles, one tile per 256-column block. Within a 32-column chunk the kernels
// hold the weights in 8 registers of 64 bytes (byte 4r + p of register k: row r, column 4k + p for
// k < 4, 16 + 4(k - 4) + p for k >= 4); the tiles store them as:
//   nibbles (64 bytes per register pair k, k + 4): register k's 4 bits in the low nibble, k + 4's
//     in the high one;
//   a bit plane (64 bytes): bit k of byte 4r + p is register k's;
//   crumbs (128 bytes): bits 2k, 2k + 1 of byte 64s + 4r + p are register 4s + k's low 2 bits.
// Tiles:
//   Q4_K (2368 bytes, 2304 in the file's layout): d[16], dmin[16] (fp16); sc[8][16];
//     m pairs[4][16][2] (the 6-bit scales and mins of sub-blocks 2p, 2p+1 of each row); then per
//     32-column sub-block its nibbles (256 bytes).
//   Q5_K (2880 bytes, 2816): as Q4_K, each sub-block's nibbles followed by the plane of its fifth bits.
//   Q6_K (3328 bytes) plus d[16] (fp16) per block kept after the group's tiles (together
//     exactly the file's size, up to 64-byte padding per group): four runs of two 32-column
//     chunks h, h+1, each run read front to back: the int8 scale pairs [16][2] of chunk h, then
//     of h+1, then per chunk qh[2][16][4], ql[4][16][4]. ql is laid out as nibbles (low 4
//     bits); in qh, bits 0-1/2-3 are the high 2 bits of ql load 2s's low/high nibble, bits
//     4-5/6-7 those of load 2s+1.
//   Q2_K (1344 bytes, the file's size): d[16], dmin[16] (fp16); per chunk the [16][2] bytes of its
//     sub-blocks' 4-bit scale | 4-bit min << 4; then per chunk the crumbs of its 2-bit weights.
//   Q3_K (1792 bytes, plus d[16] per block after the group's tiles: 1824 against the file's 1760,
//     its 6-bit scales kept as bytes): per chunk the int8 scale
//     pairs [16][2] (the file's 6-bit scales minus 32); then per chunk the crumbs of the 3-bit
//     weights (q + 4, 0..7: the weight is q - 4) and the plane of their third bits.
//   IQ4_XS (2176 bytes, plus d[16] per block after the group's tiles: 2208 against 2176): sc[8][16]
//     (int8: the 6-bit scales minus 32), then per sub-block the nibbles of its 4-bit codes.
//   IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S (the grid types; d[16] after the group's tiles; tiles of
//     1088, 1216, 1280, 1600 and 1728 bytes: the file's size for IQ2_S and IQ3_S, 3-6% more for the
//     others, whose 7-bit sign codes become a bit per value): the scales (4-bit, a byte per row and
//     two sub-blocks), then the high bits of the grid indices as 64-bit masks, then per 32-column
//     chunk its indices' low bytes in runs of 64 (byte 4r + i: row r's entry i) and their values'
//     signs as 64-bit masks. The kernels look up 64 indices at once with VPERMI2B on a table of each
//     entry's code (2 bytes: the level of each value, IQ2 3 levels, IQ3 8) and turn codes into
//     values with VPSHUFB; the AVX2 set does not pack these types (ggml's kernels were faster there
//     than gathers), and runs a matrix the VBMI set packed byte by byte.
//   32-value block types: units of blocks (Q8_0, Q4_0, IQ4_NL: pairs; MXFP4: fours): the 16 rows'
//     scales of each block of the unit (64 bytes: fp16 d, or MXFP4's e8m0 exponent), then the
//     weights of each block: Q8_0's as bytes (weight + 128, unsigned for VPDPBUSD: 512 bytes),
//     the others' 4-bit codes as nibbles (256 bytes). Each tile is the file's size (Q8_0 4352,
//     Q4_0 and IQ4_NL 2304, MXFP4 2176 bytes).
// Activations are quantized per 256 values to int8 with one float scale (per 32 values for the
// 32-value block types) and the sums of each 16 and 32 values (ActBlock), which fold the K-quants'
// mins, Q6_K's -32, Q3_K's -4 and the offsets of unsigned weights (Q8_0's +128, Q4_0's +8, the
// looked-up values' +128, MXFP4's +12) into a few integer operations per row and block.
#pragma once

#include <ggml.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lvgg::vnni {

constexpr int64_t kRows = 16;   // rows per group
constexpr int64_t kMaxTile = 4;  // tokens per pass over a row group's weights

struct alignas(64) ActBlock {
    float   d;  // value = d * qs (one scale for the 256 values), or
    int16_t bsum16[16];
    int16_t bsum32[8];
    float   d32[8];  // value = d32[i / 32] * qs[i] (a scale per 32 values: ActOrder::kPer32)
    int8_t  pad[44];
    int8_t  qs[256];
};
static_assert(sizeof(ActBlock) == 384, "ActBlock layout");

// How the kernels for weights of a type take their activations (ActBlocks):
//   kPer256: one scale per 256 values, in column order;
//   kPer32: a scale per 32 values (the 32-value block types, as ggml's own kernels do: outliers in
//     a 256-value block then cost less precision);
//   kGrid16, kGrid32: one scale per 256 values, each run of 16 (IQ3) or 32 (IQ2) values in the
//     order the grid kernels read their weights: value 4 p + i of a run is column (run values / 4)
//     i + p (4 i + p, or 8 i + p), for p < 4 or 8 and i < 4 (bsum16 and bsum32 keep their sums).
enum class ActOrder { kPer256, kPer32, kGrid16, kGrid32 };
constexpr int kActOrders = 4;
ActOrder act_order(ggml_type weight_type);

// The kernel sets this build has, best first: "avx512_vnni" (a build for a CPU with AVX-512 F/BW/VL
// and VNNI) and "avx2" (with FMA and F16C). Both run every packed type.
std::vector<std::string> kernel_sets();
// Runs the kernel set `name` (one of kernel_sets(), else false) from now on: tests and benchmarks
// compare them. Matrices packed before run as before (the layout is the same for every set).
bool use_kernels(const std::string & name);
// The kernel set in use ("" when the build has none).
std::string kernels_in_use();
// Some kernel set is in use.
bool available();
// A [rows, cols] matrix of `type` has a packed layout (the packers run on any CPU: a GPU reads
// the layout too).
bool layout_fits(ggml_type type, int64_t rows, int64_t cols);
// ... and the kernel set in use runs it.
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
// kPer32), in `order`.
void quantize_row(const void * x, ggml_type x_type, int64_t cols, ActBlock * out, ActOrder order);

// out[n][i] = row (16 g + i) of the packed matrix times activation row x[n], for n < n_tokens
// (1..kMaxTile) and one row group g (`group`: its start, from group_offset()).
void multiply_group(ggml_type type, const uint8_t * group, int64_t cols, const ActBlock * const * x, int n_tokens,
                    float * const * out);
// Byte offset of row group g in a packed matrix.
size_t group_offset(ggml_type type, int64_t cols, int64_t g);

}  // namespace lvgg::vnni
