// Every `extern "C" __global__` entry point of kernels/*.cu, by module and name, with the kinds of
// its parameters, so a launch described as data (src/lib.rs's launch_kernel: a name and a list
// of argument values) calls the kernel with its real signature, after checking that the launch
// passes as many arguments as the kernel takes, each of the kind the kernel takes.
// build.rs generates the registration of each file's entry points (OUT_DIR/registry_*.cpp).
#pragma once

#include <stdint.h>
#include <string.h>

#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {

// The kinds of a kernel argument, as src/lib.rs's Arg sends them.
enum ArgKind : uint32_t { ARG_POINTER = 0, ARG_INT32 = 1, ARG_INT64 = 2, ARG_FLOAT32 = 3, ARG_FLOAT64 = 4 };

template <class T>
constexpr uint32_t kind_of() {
    if constexpr (std::is_pointer_v<T>) {
        return ARG_POINTER;
    } else if constexpr (std::is_floating_point_v<T>) {
        static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float or double");
        return sizeof(T) == 4 ? ARG_FLOAT32 : ARG_FLOAT64;
    } else {
        static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                      "kernel parameters are pointers, 32- or 64-bit integers, float or double");
        return sizeof(T) == 4 ? ARG_INT32 : ARG_INT64;
    }
}

// The parameter of type T from the 64 bits an argument arrives in (integers in the low bits,
// two's complement; a float's bits in the low 32).
template <class T>
T from_bits(uint64_t bits) {
    if constexpr (std::is_pointer_v<T>) {
        return reinterpret_cast<T>(static_cast<uintptr_t>(bits));
    } else if constexpr (std::is_same_v<T, float>) {
        const uint32_t low = static_cast<uint32_t>(bits);
        float f;
        memcpy(&f, &low, 4);
        return f;
    } else if constexpr (std::is_same_v<T, double>) {
        double d;
        memcpy(&d, &bits, 8);
        return d;
    } else {
        return static_cast<T>(bits);
    }
}

struct KernelEntry {
    const char* module;
    const char* name;
    std::vector<uint32_t> kinds;                   // one per parameter
    std::function<void(const uint64_t*)> call;     // the kernel on those arguments
};

class KernelRegistry {
   public:
    template <class... A>
    void add(const char* module, const char* name, void (*kernel)(A...)) {
        entries.push_back(KernelEntry{module, name, {kind_of<A>()...}, [kernel](const uint64_t* bits) {
                                          call_with(kernel, bits, std::index_sequence_for<A...>{});
                                      }});
    }
    const KernelEntry* find(const char* module, const char* name) const {
        for (const KernelEntry& e : entries) {
            if (strcmp(e.module, module) == 0 && strcmp(e.name, name) == 0) { return &e; }
        }
        return nullptr;
    }

   private:
    template <class... A, size_t... I>
    static void call_with(void (*kernel)(A...), const uint64_t* bits, std::index_sequence<I...>) {
        kernel(from_bits<A>(bits[I])...);
    }
    std::vector<KernelEntry> entries;
};

// Every entry point of kernels/*.cu (OUT_DIR/registry.cpp).
const KernelRegistry& kernel_registry();

}  // namespace emu
