// The emulator's scheduler: every emulated GPU thread of a block is a fiber on one host thread,
// run until it reaches a barrier (__syncthreads or a warp collective) or returns; blocks run one
// after another. See include/cuda_emulation.h for what is emulated.

#include "cuda_emulation.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <mutex>
#include <string>
#include <vector>

namespace emu {

namespace {

constexpr size_t STACK_BYTES = 256 * 1024;

// A fiber's saved execution state, and switching between two of them. On x86-64 a switch saves
// the callee-saved registers and the floating-point control words on the stack and swaps stack
// pointers (what a function call may not change); ucontext's swapcontext also saves the signal
// mask with a system call at every switch, which was most of the emulator's time. (A process with
// CET shadow stacks enabled would fault on the switch's `ret`; Linux enables them only for
// binaries that ask, which these tests do not.)
#if defined(__x86_64__) && defined(__ELF__)
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
    .pushsection .text
    .p2align 4
    .globl emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack
    .popsection
)");

struct Context {
    void* sp = nullptr;
};

// Makes `c` start `entry` (which never returns) on the stack [stack, stack + bytes) when first
// switched to: emu_switch_stack's frame with the current control words, `entry` as its return
// address, and below the stack top a zero return address for `entry` itself (so `entry` starts
// with the stack alignment of a called function).
void context_init(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + bytes)) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                // entry's return address: never used
    *--sp = (uint64_t)entry;  // emu_switch_stack returns here
    for (int i = 0; i < 6; i++) { *--sp = 0; }  // rbp, rbx, r12..r15
    uint32_t control[2];
    asm volatile("stmxcsr %0" : "=m"(control[0]));
    asm volatile("fnstcw %0" : "=m"(control[1]));
    memcpy(--sp, control, 8);
    c.sp = sp;
}

void context_switch(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};

void context_init(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct PendingCopy {
    unsigned char* dst;
    unsigned char bytes[16];
};

struct Fiber {
    Context context;
    Coords coords;
    bool done = false;
    // waiting while *wait_generation == wait_value
    const uint64_t* wait_generation = nullptr;
    uint64_t wait_value = 0;
    uint64_t collectives = 0;  // warp collectives reached so far (selects the deposit area)
    std::vector<PendingCopy> copies;
    std::vector<size_t> group_ends;  // copies.size() at each commit, oldest first
};

struct Warp {
    int arrived = 0;
    uint64_t generation = 0;
    const char* kind = nullptr;  // the collective the arrived lanes are at
    uint64_t index = 0;          // and its number
    alignas(16) unsigned char deposits[2][32 * DEPOSIT_BYTES];
};

struct Block {
    int live = 0;     // threads that have not returned
    int arrived = 0;  // at __syncthreads
    uint64_t generation = 0;
};

struct Launch {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Block block;
    Context scheduler;
    Fiber* running = nullptr;
    unsigned char* shared = nullptr;  // dynamic shared memory: shared_bytes, then an unmapped page
    size_t shared_bytes = 0;
    unsigned char* shared_mapping = nullptr;
    size_t shared_mapping_bytes = 0;
    unsigned char* stacks = nullptr;  // the fibers' stacks, each above an unmapped guard page
    void (*kernel)(void*) = nullptr;
    void* kernel_context = nullptr;
    std::string error;
};

Launch* launch_state = nullptr;
std::mutex launch_lock;  // kernels' __shared__ variables are process-wide statics

// Stacks for up to `stack_count` fibers, kept from launch to launch (under launch_lock).
unsigned char* stack_mapping = nullptr;
size_t stack_count = 0;

// Stacks for `threads` fibers, each above an unmapped guard page; nullptr if mmap failed.
unsigned char* fiber_stacks(size_t threads) {
    if (threads <= stack_count) { return stack_mapping; }
    if (stack_mapping != nullptr) { munmap(stack_mapping, stack_count * STACK_BYTES); }
    stack_count = 0;
    void* s = mmap(nullptr, threads * STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED) {
        stack_mapping = nullptr;
        return nullptr;
    }
    stack_mapping = static_cast<unsigned char*>(s);
    stack_count = threads;
    const size_t page = (size_t)getpagesize();
    for (size_t i = 0; i < threads; i++) {
        if (mprotect(stack_mapping + i * STACK_BYTES, page, PROT_NONE) != 0) {
            munmap(stack_mapping, threads * STACK_BYTES);
            stack_mapping = nullptr;
            stack_count = 0;
            return nullptr;
        }
    }
    return stack_mapping;
}

Launch& state() { return *launch_state; }

void switch_to_scheduler() {
    Launch& l = state();
    context_switch(l.running->context, l.scheduler);
}

void wait_for(const uint64_t* generation, uint64_t value) {
    Fiber& f = *state().running;
    f.wait_generation = generation;
    f.wait_value = value;
    switch_to_scheduler();
}

void release_block_barrier_if_complete() {
    Block& b = state().block;
    if (b.arrived > 0 && b.arrived == b.live) {
        b.arrived = 0;
        b.generation++;
    }
}

void fiber_main() {
    Launch& l = state();
    l.kernel(l.kernel_context);
    l.running->done = true;
    l.block.live--;
    release_block_barrier_if_complete();
    switch_to_scheduler();
}

std::string coords_text(const Fiber& f) {
    const Coords& c = f.coords;
    return "block (" + std::to_string(c.block_idx.x) + ", " + std::to_string(c.block_idx.y) + ", " +
           std::to_string(c.block_idx.z) + ") thread " + std::to_string(c.thread_idx.x);
}

// Runs one block to the end; false (with l.error set) on a failure or a deadlock.
bool run_block(Launch& l, uint3 block_idx, dim3 grid, dim3 block) {
    const int threads = (int)(block.x * block.y * block.z);
    l.fibers.assign(threads, Fiber{});
    l.warps.assign((threads + 31) / 32, Warp{});
    l.block = Block{threads, 0, 0};
    memset(l.shared, 0xff, l.shared_bytes);
    for (int i = 0; i < threads; i++) {
        Fiber& f = l.fibers[i];
        f.coords.thread_idx = uint3{(unsigned)i % block.x, ((unsigned)i / block.x) % block.y,
                                    (unsigned)i / (block.x * block.y)};
        f.coords.block_idx = block_idx;
        f.coords.block_dim = block;
        f.coords.grid_dim = grid;
        const size_t page = (size_t)getpagesize();
        context_init(f.context, l.stacks + (size_t)i * STACK_BYTES + page, STACK_BYTES - page,
                     fiber_main);
    }
    // Each warp runs as far as it can (until its lanes wait at __syncthreads or return) before
    // the next one starts, first to last and then last to first, starting the other way round in
    // every other block: a warp that leaves a barrier gets ahead of the others in either order,
    // as on the GPU, so a missing __syncthreads shows (e.g. a stage refilled while a slower warp
    // still reads it, or a reduction step reading a value its writer has not updated yet).
    const int warps = (int)l.warps.size();
    const int parity = (int)((block_idx.x + block_idx.y + block_idx.z) % 2);
    for (int round = 0;; round++) {
        bool progressed = false, all_done = true;
        for (int i = 0; i < warps; i++) {
            const int w = (round + parity) % 2 == 0 ? i : warps - 1 - i;
            const int first = w * 32, last = std::min(threads, first + 32);
            for (bool warp_progressed = true; warp_progressed;) {
                warp_progressed = false;
                for (int tid = first; tid < last; tid++) {
                    Fiber& f = l.fibers[tid];
                    if (f.done) { continue; }
                    all_done = false;
                    if (f.wait_generation != nullptr && *f.wait_generation == f.wait_value) { continue; }
                    f.wait_generation = nullptr;
                    l.running = &f;
                    current = &f.coords;
                    context_switch(l.scheduler, f.context);
                    progressed = warp_progressed = true;
                    if (!l.error.empty()) {
                        l.error = coords_text(f) + ": " + l.error;
                        return false;
                    }
                }
            }
        }
        if (all_done) { return true; }
        if (!progressed) {
            for (const Fiber& f : l.fibers) {
                if (!f.done) {
                    const int w = (int)(&f - l.fibers.data()) / 32;
                    const bool at_warp = f.wait_generation == &l.warps[w].generation;
                    l.error = "deadlock: " + coords_text(f) + " waits at " +
                              (at_warp ? std::string("warp collective ") + l.warps[w].kind
                                       : std::string("__syncthreads")) +
                              " (" + std::to_string(l.block.live) + " threads live)";
                    return false;
                }
            }
        }
    }
}

// A memory fault inside a kernel (out of bounds, or a misaligned 16-byte vector access) cannot be
// turned into a launch error; this names the emulated thread on stderr, then lets the previous
// handler (or the default action) end the process on the same fault.
struct sigaction previous_segv, previous_bus, previous_fpe;

void append_number(char*& at, unsigned v) {
    char digits[12];
    int n = 0;
    do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v != 0);
    while (n > 0) { *at++ = digits[--n]; }
}

void on_fault(int sig, siginfo_t*, void*) {
    char message[160];
    char* at = message;
    auto text = [&](const char* t) { while (*t != 0) { *at++ = *t++; } };
    text(sig == SIGFPE ? "cuda emulator: integer division by zero in a kernel at block ("
                       : "cuda emulator: memory fault in a kernel at block (");
    if (current != nullptr) {
        append_number(at, current->block_idx.x);
        text(", ");
        append_number(at, current->block_idx.y);
        text(", ");
        append_number(at, current->block_idx.z);
        text(") thread ");
        append_number(at, current->thread_idx.x);
    } else {
        text("?)");
    }
    text(sig == SIGFPE ? " (the GPU would go on with garbage)\n"
                       : " (out of bounds, or a misaligned 16-byte access)\n");
    if (write(STDERR_FILENO, message, (size_t)(at - message)) < 0) {}
    const struct sigaction* previous =
        sig == SIGSEGV ? &previous_segv : sig == SIGBUS ? &previous_bus : &previous_fpe;
    sigaction(sig, previous, nullptr);  // the fault repeats
}

}  // namespace

const Coords* current = nullptr;

void fail(const char* message) {
    Launch& l = state();
    l.error = message;
    switch_to_scheduler();
    __builtin_unreachable();  // the scheduler never resumes a failed fiber
}

void syncthreads() {
    Launch& l = state();
    Block& b = l.block;
    const uint64_t gen = b.generation;
    b.arrived++;
    release_block_barrier_if_complete();
    if (b.generation == gen) { wait_for(&b.generation, gen); }
}

const unsigned char* warp_exchange(const char* kind, const void* in, size_t bytes) {
    Launch& l = state();
    Fiber& f = *l.running;
    const int tid = (int)(&f - l.fibers.data());
    Warp& w = l.warps[tid / 32];
    if (l.fibers.size() % 32 != 0) { fail("a warp collective in a block that is not whole warps"); }
    if (bytes > DEPOSIT_BYTES) { fail("a warp collective deposit is too large"); }
    if (w.arrived == 0) {
        w.kind = kind;
        w.index = f.collectives;
    } else if (strcmp(w.kind, kind) != 0 || w.index != f.collectives) {
        static thread_local std::string message;
        message = std::string("lanes of one warp at different collectives: ") + kind + " #" +
                  std::to_string(f.collectives) + " and " + w.kind + " #" + std::to_string(w.index);
        fail(message.c_str());
    }
    unsigned char* area = w.deposits[f.collectives % 2];
    if (bytes > 0) { memcpy(area + (tid % 32) * DEPOSIT_BYTES, in, bytes); }
    f.collectives++;
    const uint64_t gen = w.generation;
    if (++w.arrived == 32) {
        w.arrived = 0;
        w.generation++;
    } else {
        wait_for(&w.generation, gen);
    }
    return area;
}

unsigned char* dynamic_shared() { return state().shared; }

bool in_dynamic_shared(const void* p, size_t bytes) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    Launch& l = state();
    return c >= l.shared && c + bytes <= l.shared + l.shared_bytes;
}

void copy_async16(void* dst, const void* src, bool valid) {
    if (((uintptr_t)dst & 15) != 0 || ((uintptr_t)src & 15) != 0) { fail("cp.async: an address is not 16-byte aligned"); }
    if (!in_dynamic_shared(dst, 16)) { fail("cp.async: the destination lies outside dynamic shared memory"); }
    PendingCopy c;
    c.dst = static_cast<unsigned char*>(dst);
    if (valid) {
        memcpy(c.bytes, src, 16);
    } else {
        memset(c.bytes, 0, 16);
    }
    memset(c.dst, 0xff, 16);
    state().running->copies.push_back(c);
}

void copy_async_commit() {
    Fiber& f = *state().running;
    f.group_ends.push_back(f.copies.size());
}

void copy_async_wait(int pending) {
    Fiber& f = *state().running;
    const int groups = (int)f.group_ends.size();
    if (groups <= pending) { return; }
    const size_t done = f.group_ends[groups - pending - 1];
    for (size_t i = 0; i < done; i++) { memcpy(f.copies[i].dst, f.copies[i].bytes, 16); }
    f.copies.erase(f.copies.begin(), f.copies.begin() + (ptrdiff_t)done);
    f.group_ends.erase(f.group_ends.begin(), f.group_ends.begin() + (groups - pending));
    for (size_t& end : f.group_ends) { end -= done; }
}

}  // namespace emu

// Runs `kernel(context)` as every thread of a grid x block launch with `shared_bytes` of dynamic
// shared memory. Returns 0, or 1 with a message in `error` (at most error_len bytes with the
// terminating zero).
extern "C" int emu_launch(unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x,
                          unsigned block_y, unsigned block_z, size_t shared_bytes,
                          void (*kernel)(void*), void* context, char* error, size_t error_len) {
    std::lock_guard<std::mutex> guard(emu::launch_lock);
    emu::Launch l;
    l.kernel = kernel;
    l.kernel_context = context;
    const size_t page = (size_t)getpagesize();
    const size_t threads = (size_t)block_x * block_y * block_z;
    std::string message;
    if (grid_x == 0 || grid_y == 0 || grid_z == 0 || grid_x > 0x7fffffffu || grid_y > 65535 ||
        grid_z > 65535) {
        // cuLaunchKernel refuses these (CUDA_ERROR_INVALID_VALUE)
        message = "grid must be 1..2^31-1 blocks in x and 1..65535 in y and z";
    } else if (threads == 0 || threads > 1024 || block_z > 64) {
        message = "block size must be 1..1024 threads, at most 64 in z";
    } else {
        // dynamic shared memory ends where an unmapped page begins
        const size_t rounded = (shared_bytes + 15) / 16 * 16;
        l.shared_mapping_bytes = (rounded + page - 1) / page * page + page;
        void* m = mmap(nullptr, l.shared_mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        l.stacks = emu::fiber_stacks(threads);
        if (m == MAP_FAILED || l.stacks == nullptr) {
            message = "mapping the shared memory or the fiber stacks failed";
        } else {
            l.shared_mapping = static_cast<unsigned char*>(m);
            unsigned char* guard_page = l.shared_mapping + l.shared_mapping_bytes - page;
            mprotect(guard_page, page, PROT_NONE);
            l.shared = guard_page - rounded;
            l.shared_bytes = shared_bytes;
            emu::launch_state = &l;
            struct sigaction fault = {};
            fault.sa_sigaction = emu::on_fault;
            fault.sa_flags = SA_SIGINFO;
            sigaction(SIGSEGV, &fault, &emu::previous_segv);
            sigaction(SIGBUS, &fault, &emu::previous_bus);
            sigaction(SIGFPE, &fault, &emu::previous_fpe);
            const dim3 grid{grid_x, grid_y, grid_z}, block{block_x, block_y, block_z};
            for (unsigned z = 0; z < grid_z && message.empty(); z++) {
                for (unsigned y = 0; y < grid_y && message.empty(); y++) {
                    for (unsigned x = 0; x < grid_x && message.empty(); x++) {
                        if (!emu::run_block(l, uint3{x, y, z}, grid, block)) { message = l.error; }
                    }
                }
            }
            sigaction(SIGSEGV, &emu::previous_segv, nullptr);
            sigaction(SIGBUS, &emu::previous_bus, nullptr);
            sigaction(SIGFPE, &emu::previous_fpe, nullptr);
            emu::launch_state = nullptr;
            emu::current = nullptr;
        }
        if (m != MAP_FAILED) { munmap(m, l.shared_mapping_bytes); }
    }
    if (message.empty()) { return 0; }
    if (error_len > 0) {
        const size_t n = std::min(message.size(), error_len - 1);
        memcpy(error, message.data(), n);
        error[n] = 0;
    }
    return 1;
}
