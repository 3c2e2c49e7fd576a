// emu_launch_kernel: a launch described as data (src/lib.rs's launch_kernel), as thinkshort's
// launchers describe theirs (src/cuda/launch.rs's KernelLaunch): the kernel is found by module
// and name among the entry points build.rs registered, the arguments are checked against its
// parameters (count and kinds), and it runs as every thread of the grid (emu_launch).

#include <stdarg.h>
#include <stdio.h>

#include "kernel_registry.h"

extern "C" int emu_launch(unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x,
                          unsigned block_y, unsigned block_z, size_t shared_bytes,
                          void (*kernel)(void*), void* context, char* error, size_t error_len);

namespace {

const char* kind_name(uint32_t kind) {
    switch (kind) {
        case emu::ARG_POINTER: return "pointer";
        case emu::ARG_INT32: return "32-bit integer";
        case emu::ARG_INT64: return "64-bit integer";
        case emu::ARG_FLOAT32: return "float";
        case emu::ARG_FLOAT64: return "double";
        default: return "unknown kind";
    }
}

int refuse(char* error, size_t error_len, const char* format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(error, error_len, format, args);
    va_end(args);
    return 1;
}

struct Call {
    const emu::KernelEntry* entry;
    const uint64_t* bits;
};

void run_thread(void* context) {
    const Call* call = static_cast<const Call*>(context);
    call->entry->call(call->bits);
}

}  // namespace

extern "C" int emu_launch_kernel(const char* module, const char* name, unsigned grid_x,
                                 unsigned grid_y, unsigned grid_z, unsigned block_x,
                                 unsigned block_y, unsigned block_z, size_t shared_bytes,
                                 const uint32_t* kinds, const uint64_t* bits, size_t n_args,
                                 char* error, size_t error_len) {
    const emu::KernelEntry* entry = emu::kernel_registry().find(module, name);
    if (entry == nullptr) {
        return refuse(error, error_len, "no kernel %s in kernels/%s.cu", name, module);
    }
    if (n_args != entry->kinds.size()) {
        return refuse(error, error_len, "%s takes %zu arguments, the launch passes %zu", name,
                      entry->kinds.size(), n_args);
    }
    for (size_t i = 0; i < n_args; i++) {
        if (kinds[i] != entry->kinds[i]) {
            return refuse(error, error_len, "%s: argument %zu is a %s, the kernel takes a %s", name,
                          i, kind_name(kinds[i]), kind_name(entry->kinds[i]));
        }
    }
    Call call{entry, bits};
    return emu_launch(grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_bytes, run_thread,
                      &call, error, error_len);
}
