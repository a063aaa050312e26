// Read bandwidth of this machine's memory, measured the way the MoE engine reads weights:
// several threads streaming disjoint slices of a buffer much larger than the caches.
#pragma once

#include <cstddef>
#include <vector>

namespace lvgg {

// Best of `repeats` passes, in bytes per second. cpus: pin thread i to cpus[i] (may be empty).
double read_bandwidth(size_t nbytes, int n_threads, const std::vector<int> & cpus, int repeats);

}  // namespace lvgg
