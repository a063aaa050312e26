#include "quantize.h"

#include "errors.h"

#include <algorithm>
#include <cctype>
#include <thread>
#include <vector>

namespace lvgg {

static std::string upper(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return (char) std::toupper(c); });
    return s;
}

ggml_type type_from_name(const std::string & name) {
    const std::string want = upper(name);
    std::string       known;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        if (ggml_type_size((ggml_type) t) == 0) {
            continue;  // removed types keep their ids but have no traits
        }
        const std::string n = upper(ggml_type_name((ggml_type) t));
        if (n == want) {
            return (ggml_type) t;
        }
        known += (known.empty() ? "" : ", ") + n;
    }
    fail(ErrorKind::Value, "unknown ggml type '" + name + "'; known types: " + known);
}

size_t quantized_row_size(ggml_type type, int64_t n_per_row) {
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_type_size(type) == 0) {
        fail(ErrorKind::Value, "not a ggml type id: " + std::to_string((int) type));
    }
    if (type == GGML_TYPE_I8 || type == GGML_TYPE_I16 || type == GGML_TYPE_I32 || type == GGML_TYPE_I64) {
        fail(ErrorKind::Value, std::string("cannot quantize floats to the integer type ") + ggml_type_name(type));
    }
    const int64_t blk = ggml_blck_size(type);
    if (n_per_row <= 0 || n_per_row % blk != 0) {
        fail(ErrorKind::Value, "rows of " + std::to_string(n_per_row) + " values cannot be stored as " +
                                   ggml_type_name(type) + ": the row length must be a positive multiple of its block size " +
                                   std::to_string(blk));
    }
    return ggml_row_size(type, n_per_row);
}

void quantize_rows(ggml_type type, const float * src, void * dst, int64_t n_rows, int64_t n_per_row, int n_threads,
                   const float * imatrix) {
    quantized_row_size(type, n_per_row);  // validates type and row length
    if (!imatrix && ggml_quantize_requires_imatrix(type)) {
        fail(ErrorKind::Value, std::string(ggml_type_name(type)) +
                                   " needs an importance matrix to quantize; pass one or pick another type (e.g. Q4_K)");
    }
    ggml_quantize_init(type);
    n_threads = std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows));
    auto work = [&](int64_t r0, int64_t r1) {
        if (r1 > r0) {
            ggml_quantize_chunk(type, src, dst, r0 * n_per_row, r1 - r0, n_per_row, imatrix);
        }
    };
    if (n_threads == 1) {
        work(0, n_rows);
        return;
    }
    std::vector<std::thread> threads;
    for (int i = 0; i < n_threads; ++i) {
        threads.emplace_back(work, n_rows * i / n_threads, n_rows * (i + 1) / n_threads);
    }
    for (auto & t : threads) {
        t.join();
    }
}

}  // namespace lvgg
