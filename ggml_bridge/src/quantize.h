// Quantize f32 rows into any ggml type with ggml's own quantizer, on several threads.
#pragma once

#include <ggml.h>

#include <cstdint>
#include <string>

namespace lvgg {

// ggml type from its name ("Q4_K", "bf16", ...), case-insensitive; throws ValueError.
ggml_type type_from_name(const std::string & name);

// Row size in bytes of `n_per_row` values of `type`; throws if n_per_row is not a
// multiple of the type's block size.
size_t quantized_row_size(ggml_type type, int64_t n_per_row);

// src: [n_rows, n_per_row] f32; dst: n_rows * quantized_row_size(type, n_per_row) bytes.
// imatrix: nullptr, or n_per_row importance weights (one per column, as llama.cpp's imatrix
// holds for a weight's input dimension); required by the types ggml cannot quantize without
// one (IQ1_S, IQ2_XXS, IQ2_XS), which throw otherwise.
void quantize_rows(ggml_type type, const float * src, void * dst, int64_t n_rows, int64_t n_per_row, int n_threads,
                   const float * imatrix = nullptr);

}  // namespace lvgg
