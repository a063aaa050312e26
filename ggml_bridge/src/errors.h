// Errors raised by the bridge. Every check that could otherwise trip a GGML_ASSERT (which
// aborts the whole process) is done in our code first and throws one of these; the Python
// binding maps each kind to the matching Python exception.
#pragma once

#include <stdexcept>
#include <string>

namespace lvgg {

enum class ErrorKind { Value, Type, Index, File, Runtime };

class Error : public std::runtime_error {
  public:
    Error(ErrorKind kind, const std::string & msg) : std::runtime_error(msg), kind_(kind) {}
    ErrorKind kind() const { return kind_; }

  private:
    ErrorKind kind_;
};

[[noreturn]] inline void fail(ErrorKind kind, const std::string & msg) { throw Error(kind, msg); }

// The last lines ggml logged on this thread (gguf parse errors arrive this way).
std::string ggml_recent_log();
void        ggml_clear_recent_log();
void        install_ggml_log_capture();

}  // namespace lvgg
