#include "errors.h"

#include <ggml.h>

#include <cstdio>
#include <cstdlib>

namespace lvgg {

namespace {
thread_local std::string recent_log;

void capture(enum ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_DEBUG) {
        return;
    }
    recent_log += text;
    if (recent_log.size() > 4096) {
        recent_log.erase(0, recent_log.size() - 4096);
    }
    if (level == GGML_LOG_LEVEL_WARN && std::getenv("LVGG_GGML_LOG")) {
        std::fputs(text, stderr);
    }
}
}  // namespace

std::string ggml_recent_log() {
    std::string s = recent_log;
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) {
        s.pop_back();
    }
    return s;
}

void ggml_clear_recent_log() { recent_log.clear(); }

void install_ggml_log_capture() { ggml_log_set(capture, nullptr); }

}  // namespace lvgg
