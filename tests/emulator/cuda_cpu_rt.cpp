// cuda_cpu_rt.cpp -- runtime for cuda_cpu.h: fiber scheduler, block/warp/grid barriers, randomized schedules,
// divergence/deadlock detection, guard pages and page-granular global-memory traffic counting.
//
// It is linked into every kernel module (the per-block poisoning of __shared__ memory poisons *this* module's
// TLS block, and the fibers must run this module's kernels).  Memory, however, is process-wide: one module (the
// "core", built from no kernels at all) owns every allocation, the guard pages and the traffic counters, and the
// other modules reach it through a table of function pointers (cuda_cpu_bind_core), so that arrays can be shared
// between modules and one fault handler knows every buffer.
//
// Signals. The core installs the process's one handler for SIGSEGV/SIGBUS/SIGILL/SIGFPE and the watchdog's
// SIGUSR2; modules install none. The handler finds the faulting fiber from the interrupted stack pointer in a
// table of fiber-stack spans that the modules register with the core, and calls that module's callback. So a
// fault costs the same stack whatever number of modules is loaded, the handler touches no thread_local (which,
// in a module the thread has not used yet, glibc would allocate with malloc inside the handler), takes no lock
// and calls nothing that does (the faulting instruction's library is named after the launch, not by dladdr in
// the handler). Launches run their workers on the emulator's own guarded signal stack, never on one the
// process installed (CPython's faulthandler keeps its stack in the malloc heap: running past its end there
// corrupted the heap silently). Memory is never unmapped or reused while a launch runs (alloc and free wait
// for it), so no mprotect of the launch can land on memory that has been handed to someone else.
// System headers first: cuda_cpu.h defines __noinline__, which libstdc++ uses as an attribute name.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include "cuda_cpu.h"

#if !defined(__x86_64__)
#error "the emulator's fiber switch is written for x86-64"
#endif

#define EXPORT extern "C" __attribute__((visibility("default")))

// Defined by the build (generated assembly): the dynamic shared memory buffer; every
// "extern __shared__ T name[]" symbol of the kernel file is an alias of it.
extern "C" __thread unsigned char __cuda_cpu_dynsmem[];
static constexpr size_t kMaxDynSmem = 227 * 1024;  // sm_90 opt-in maximum per block
static constexpr int kMaxThreads = 1024;
static constexpr size_t kPage = 4096;
static constexpr size_t kCanary = 64;  // bytes checked at the bottom of fiber stacks that have no guard page
static constexpr size_t kAltStack = 128 << 10;  // signal stack of a worker (a frame with AMX state is ~12 KiB)

namespace cuda_cpu {
namespace detail {

// ------------------------------------------------------------------ context switch
// cc_switch(save, to): push callee-saved registers, store rsp to *save, load `to`, pop, return.
// MXCSR / x87 control word are not saved (kernels do not change rounding modes).
asm(R"(
  .text
  .p2align 4
  .globl cc_switch
  .hidden cc_switch
  .type cc_switch,@function
cc_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cc_switch, .-cc_switch
  .p2align 4
  .globl cc_trampoline
  .hidden cc_trampoline
  .type cc_trampoline,@function
cc_trampoline:
  movq %r13, %rdi
  callq *%r12
  ud2
  .size cc_trampoline, .-cc_trampoline
)");
extern "C" void cc_switch(void** save, void* to);
extern "C" void cc_trampoline();

enum FState : int { F_READY = 0, F_RUN, F_BAR, F_WARP, F_EXIT };

struct LaunchCtx;

struct Fiber {
  void* sp;
  char* stack_lo;
  char* stack_hi;
  bool guarded;  // PROT_NONE page below the stack; otherwise a canary is checked at block end
  Worker* w;
  uint3 tid;
  int linear, lane, warp, state;
  const char* bar_file;
  int bar_line, bar_op, bar_pred;
  WarpOp* wop;
};

struct WarpState { unsigned exists, exited, waiting; };

struct Worker {  // one OS thread executing blocks, one at a time
  int index = 0;
  void* sched_sp = nullptr;
  char* stack_mem = nullptr;
  size_t stack_mem_bytes = 0, stack_bytes = 0;
  int nstacks = 0, nguarded = 0;
  char* altstack = nullptr;  // kAltStack bytes above a PROT_NONE page (mmap, not the malloc heap)
  int span = -1;              // this worker's slot in the core's table of fiber-stack spans
  Fiber fibers[kMaxThreads];
  WarpState warps[kMaxThreads / 32];
  int rq[kMaxThreads];
  int rq_head = 0, rq_count = 0;
  int nthreads = 0, nexited = 0, bar_arrived = 0, bar_result = 0, first_exited = -1;
  bool grid_wait = false;  // every thread of the block is at grid.sync(): the scheduler passes the grid barrier
  uint64_t rng = 0;
  bool randomize = false;
  bool error = false;
  const LaunchDesc* desc = nullptr;
  LaunchCtx* L = nullptr;
  uint3 bidx{};
  uint64_t resumes = 0;
  char* tls_lo = nullptr;
  size_t tls_size = 0;
};

// Grid-wide barrier of a cooperative launch: one OS thread per block, so a plain counting barrier.
struct GridBarrier {
  std::mutex mu;
  std::condition_variable cv;
  int nblocks = 0, arrived = 0, exited = 0;
  uint64_t gen = 0;
  const char* file = "";
  int line = 0;
  uint3 first_waiter{}, first_exited{};
};

struct LaunchCtx {
  const LaunchDesc* d = nullptr;
  std::vector<uint64_t> order;  // block execution order (a seeded permutation)
  std::atomic<uint64_t> next{0};
  uint64_t seed = 0;
  bool coop = false;
  GridBarrier gb;
};

// ------------------------------------------------------------------ memory core interface (see file comment)
struct CoreApi {
  int (*classify)(uintptr_t addr, int write, char* msg, size_t n);  // 1: tracking fault, handled
  void (*launch_begin)();                                            // serialize launches, arm tracking
  void (*launch_end)();                                              // harvest tracking, unlock
  void (*phase)();                                                   // grid.sync(): tracked pages count again
  int (*take_guards)(int n);                                         // guard pages for fiber stacks: granted
  void (*give_guards)(int n);
  void (*install)();                                                 // the process's signal handlers (once)
  int (*add_span)(uintptr_t lo, uintptr_t hi, void* worker, void (*fn)(void*, uintptr_t, int, siginfo_t*,
                                                                          ucontext_t*, const char*));
  void (*remove_span)(int slot);
};
static int core_classify(uintptr_t a, int write, char* msg, size_t n);
static void core_launch_begin();
static void core_launch_end();
static void core_phase();
static int core_take_guards(int n);
static void core_give_guards(int n);
using SpanFn = void (*)(void* worker, uintptr_t sp, int sig, siginfo_t* si, ucontext_t* uc, const char* msg);
static void core_install();
static int core_add_span(uintptr_t lo, uintptr_t hi, void* worker, SpanFn fn);
static void core_remove_span(int slot);
static CoreApi g_local_core = {core_classify, core_launch_begin, core_launch_end, core_phase,
                                core_take_guards, core_give_guards, core_install, core_add_span,
                                core_remove_span};
static const CoreApi* g_core = &g_local_core;

// ------------------------------------------------------------------ global state
struct Config {
  uint64_t seed = 1;             // 0: in-order blocks and FIFO fiber order; else randomized
  int workers = 1;               // OS threads executing the blocks of a normal launch
  size_t stack_bytes = 64 << 10;
  int poison = 1;                // poison __shared__ memory (0xFF) at every block start
  long long timeout_ms = 60000;  // watchdog: fail a launch that runs longer (0 = off)
  int max_coop_blocks = 64;      // co-resident blocks a cooperative launch may have
};
static Config g_cfg;
static std::mutex g_launch_mu;
static std::atomic<bool> g_failed{false};
static char g_errbuf[4096];
static std::vector<Worker*> g_workers;
static std::atomic<uint64_t> g_stat_resumes{0}, g_stat_blocks{0}, g_stat_launches{0};
static double g_stat_run_ns = 0;

static inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static inline uint64_t xs64(uint64_t& s) {
  s ^= s << 13; s ^= s >> 7; s ^= s << 17;
  return s;
}
static double now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static std::atomic<uintptr_t> g_fault_pc{0};  // instruction of the reported fault, named after the launch

static bool set_error_raw(const char* msg) {  // the first error of a launch wins
  bool expected = false;
  if (g_failed.compare_exchange_strong(expected, true)) {
    strncpy(g_errbuf, msg, sizeof g_errbuf - 1);
    g_errbuf[sizeof g_errbuf - 1] = 0;
    return true;
  }
  return false;
}

// Records the launch's error (the first one wins); returns whether this was it.  Called from signal handlers
// too: vsnprintf into a stack buffer with %s/%d/%u/%p/%zu formats takes no lock and allocates nothing.
static bool failf(Worker* W, const Fiber* f, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
static bool failf(Worker* W, const Fiber* f, const char* fmt, ...) {
  if (W) {
    if (W->error) return false;
    W->error = true;
  }
  char msg[2048], full[3072];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (W && W->desc) {
    char who[128] = "";
    if (f) snprintf(who, sizeof who, " thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
    snprintf(full, sizeof full, "[%s] block (%u,%u,%u)%s: %s", W->desc->name, W->bidx.x, W->bidx.y, W->bidx.z,
             who, msg);
  } else {
    snprintf(full, sizeof full, "%s", msg);
  }
  return set_error_raw(full);
}

// ------------------------------------------------------------------ fibers
// A blocking fiber switches directly to the next ready fiber (one context switch per resume); it only returns
// to the scheduler context when nothing is ready (block done, deadlock, grid barrier) or on error.
static inline int rq_pop(Worker* W);
static inline void enter(Worker* W, Fiber* g) {
  tls.thread_idx = g->tid;
  tls.fiber = g;
  g->state = F_RUN;
  W->resumes++;
}
static inline void switch_out(Fiber* f) {
  Worker* W = f->w;
  if (!W->error && W->rq_count > 0) {
    Fiber* g = &W->fibers[rq_pop(W)];
    enter(W, g);
    if (g == f) return;  // picked itself: just continue
    cc_switch(&f->sp, g->sp);
  } else {
    tls.fiber = nullptr;
    cc_switch(&f->sp, W->sched_sp);
  }
}
[[noreturn]] static void park_forever(Fiber* f) {  // exited, or after an error: never resumed again
  switch_out(f);
  __builtin_trap();
}
static inline void resume(Worker* W, Fiber* f) {  // from the scheduler context
  enter(W, f);
  cc_switch(&W->sched_sp, f->sp);
  tls.fiber = nullptr;
}
static inline void rq_push(Worker* W, int i) {
  W->rq[(W->rq_head + W->rq_count) & (kMaxThreads - 1)] = i;
  W->rq_count++;
}
static inline int rq_pop(Worker* W) {
  if (W->randomize && W->rq_count > 1) {
    int k = (int)(((xs64(W->rng) >> 32) * (uint64_t)W->rq_count) >> 32);  // Lemire range reduction
    int a = W->rq_head, b = (W->rq_head + k) & (kMaxThreads - 1);
    int t = W->rq[a]; W->rq[a] = W->rq[b]; W->rq[b] = t;
  }
  int i = W->rq[W->rq_head];
  W->rq_head = (W->rq_head + 1) & (kMaxThreads - 1);
  W->rq_count--;
  return i;
}

static void check_barrier(Worker* W);
static void on_exit(Worker* W, Fiber* f);

static void fiber_main(Fiber* f) {
  Worker* W = f->w;
  W->desc->invoke(W->desc->closure);
  on_exit(W, f);
  park_forever(f);
}
static void init_fiber(Fiber* f) {
  uintptr_t top = (uintptr_t)f->stack_hi & ~(uintptr_t)15;
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 7;
  sp[0] = 0; sp[1] = 0;                                  // r15 r14
  sp[2] = (uint64_t)f;                                   // r13 -> rdi
  sp[3] = (uint64_t)(void*)&fiber_main;                  // r12 -> call target
  sp[4] = 0; sp[5] = 0;                                  // rbx rbp
  sp[6] = (uint64_t)(void*)&cc_trampoline;               // return address
  f->sp = sp;
  if (!f->guarded) memset(f->stack_lo, 0xA5, kCanary);
}
static bool canary_ok(const Fiber* f) {
  if (f->guarded) return true;
  for (size_t i = 0; i < kCanary; ++i)
    if ((unsigned char)f->stack_lo[i] != 0xA5) return false;
  return true;
}

// ------------------------------------------------------------------ fiber stacks
// Stacks are mapped lazily, for as many threads as the largest block a worker has run.  A PROT_NONE page below
// each stack turns an overflow into a clean report, but costs two memory mappings per stack and Linux allows
// ~65k per process (vm.max_map_count); so guard pages come from a process-wide budget, and stacks beyond it get a
// canary instead (checked when the block ends).
static void fiber_signal(void* worker, uintptr_t sp, int sig, siginfo_t* si, ucontext_t* uc, const char* msg);

static void release_stacks(Worker* W) {
  if (!W->stack_mem) return;
  g_core->remove_span(W->span);  // before the unmap: a stray signal must not find the span any more
  W->span = -1;
  munmap(W->stack_mem, W->stack_mem_bytes);
  g_core->give_guards(W->nguarded);
  W->stack_mem = nullptr;
  W->stack_mem_bytes = 0;
  W->nstacks = W->nguarded = 0;
}
static bool ensure_stacks(Worker* W, int n) {
  n = (n + 31) & ~31;
  if (W->stack_mem && W->nstacks >= n && W->stack_bytes == g_cfg.stack_bytes) return true;
  release_stacks(W);
  const size_t per = g_cfg.stack_bytes + kPage;
  void* m = mmap(nullptr, per * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return false;
  W->stack_mem = (char*)m;
  W->stack_mem_bytes = per * n;
  W->stack_bytes = g_cfg.stack_bytes;
  W->nstacks = n;
  W->nguarded = g_core->take_guards(n);
  for (int i = 0; i < n; ++i) {
    Fiber* f = &W->fibers[i];
    char* base = W->stack_mem + per * i;
    // The lowest page of the mapping is always a guard (beyond the budget too): an unguarded stack then
    // overflows into its neighbour's, inside this mapping, never into whatever lies below it.
    f->guarded = (i < W->nguarded || i == 0) && mprotect(base, kPage, PROT_NONE) == 0;
    f->stack_lo = base + kPage;
    f->stack_hi = base + per;
    f->w = W;
  }
  W->span = g_core->add_span((uintptr_t)m, (uintptr_t)m + per * n, W, fiber_signal);
  if (W->span < 0) {  // the handler could not tell this worker's fibers from a crash
    release_stacks(W);
    return false;
  }
  return true;
}

static Worker* get_worker(int index) {  // single-threaded callers only
  while ((int)g_workers.size() <= index) {
    Worker* W = new Worker();
    W->index = (int)g_workers.size();
    g_workers.push_back(W);
  }
  Worker* W = g_workers[index];
  if (!W->altstack) {
    void* m = mmap(nullptr, kAltStack + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m != MAP_FAILED) {
      mprotect(m, kPage, PROT_NONE);  // running off the end faults instead of overwriting a neighbour
      W->altstack = (char*)m + kPage;
    }
  }
  return W;
}

// Signal handlers must not run on the (overflowed) fiber stack, nor on a signal stack the process installed:
// its size is the installer's guess (CPython's faulthandler: SIGSTKSZ + AT_MINSIGSTKSZ, from the heap).  The
// worker's own stack is installed for the launch and the previous one restored after it.
static bool enter_altstack(Worker* W, stack_t* old) {
  if (!W->altstack) return false;
  stack_t ss;
  ss.ss_sp = W->altstack;
  ss.ss_size = kAltStack;
  ss.ss_flags = 0;
  return sigaltstack(&ss, old) == 0;
}
static void leave_altstack(const stack_t* old) {
  stack_t prev = *old;
  if (prev.ss_flags & SS_DISABLE) prev.ss_size = 0;
  prev.ss_flags &= SS_DISABLE;
  sigaltstack(&prev, nullptr);
}

// ------------------------------------------------------------------ __shared__ poisoning
struct TlsFind { char* lo; size_t size; };
static int tls_cb(dl_phdr_info* info, size_t, void* data) {
  uintptr_t me = (uintptr_t)(void*)&tls_cb;
  bool mine = false;
  size_t memsz = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& p = info->dlpi_phdr[i];
    if (p.p_type == PT_LOAD) {
      uintptr_t lo = info->dlpi_addr + p.p_vaddr;
      if (me >= lo && me < lo + p.p_memsz) mine = true;
    } else if (p.p_type == PT_TLS) {
      memsz = p.p_memsz;
    }
  }
  if (!mine) return 0;
  auto* out = static_cast<TlsFind*>(data);
  out->lo = (char*)info->dlpi_tls_data;
  out->size = memsz;
  return 1;
}
static void locate_tls(Worker* W) {  // this OS thread's instance of the module's TLS segment
  tls.worker = W;                    // touch TLS so that it is allocated for this thread
  volatile unsigned char* touch = __cuda_cpu_dynsmem;
  (void)touch;
  TlsFind tf{nullptr, 0};
  dl_iterate_phdr(tls_cb, &tf);
  W->tls_lo = tf.lo;
  W->tls_size = tf.lo ? tf.size : 0;
}
static void poison_shared(Worker* W, size_t dyn) {
  // Everything in the TLS block except the runtime's ThreadState and the (large) dynamic buffer, of which only
  // the requested bytes are poisoned.
  unsigned char* dyn_lo = __cuda_cpu_dynsmem;
  if (W->tls_lo) {
    char* lo = W->tls_lo;
    char* hi = lo + W->tls_size;
    char* cuts[4] = {(char*)&tls, (char*)&tls + sizeof(tls), (char*)dyn_lo, (char*)dyn_lo + kMaxDynSmem};
    if (cuts[2] < cuts[0]) { std::swap(cuts[0], cuts[2]); std::swap(cuts[1], cuts[3]); }
    auto fill = [](char* a, char* b) { if (b > a) memset(a, 0xff, b - a); };
    fill(lo, std::min(hi, cuts[0]));
    fill(std::max(lo, cuts[1]), std::min(hi, cuts[2]));
    fill(std::max(lo, cuts[3]), hi);
  }
  if (dyn) memset(dyn_lo, 0xff, dyn);
}

// ------------------------------------------------------------------ block barrier
static const char* barrier_name(int op) {
  static const char* n[] = {"__syncthreads()", "__syncthreads_count()", "__syncthreads_and()", "__syncthreads_or()",
                            "grid.sync()"};
  return (op >= 0 && op <= B_GRID) ? n[op] : "?";
}
static void check_barrier(Worker* W) {
  if (W->bar_arrived == 0 || W->bar_arrived + W->nexited != W->nthreads) return;
  Fiber* waiter = nullptr;
  for (int i = 0; i < W->nthreads && !waiter; ++i)
    if (W->fibers[i].state == F_BAR) waiter = &W->fibers[i];
  if (W->nexited) {
    const Fiber* ex = &W->fibers[W->first_exited];
    failf(W, ex,
          "barrier divergence: this thread exited while %d other thread(s) wait at %s %s:%d "
          "(%d thread(s) exited in total)",
          W->bar_arrived, barrier_name(waiter->bar_op), waiter->bar_file, waiter->bar_line, W->nexited);
    return;
  }
  int count = 0;
  for (int i = 0; i < W->nthreads; ++i) {
    Fiber* f = &W->fibers[i];
    if (f->bar_line != waiter->bar_line || f->bar_op != waiter->bar_op ||
        (f->bar_file != waiter->bar_file && strcmp(f->bar_file, waiter->bar_file))) {
      int n_a = 0;
      for (int j = 0; j < W->nthreads; ++j)
        n_a += W->fibers[j].bar_line == waiter->bar_line && !strcmp(W->fibers[j].bar_file, waiter->bar_file);
      failf(W, f,
            "barrier divergence: threads wait at different barriers: %s %s:%d (%d thread(s), e.g. thread "
            "(%u,%u,%u)) vs %s %s:%d (this thread and %d other(s))",
            barrier_name(waiter->bar_op), waiter->bar_file, waiter->bar_line, n_a, waiter->tid.x, waiter->tid.y,
            waiter->tid.z, barrier_name(f->bar_op), f->bar_file, f->bar_line, W->nthreads - n_a - 1);
      return;
    }
    count += f->bar_pred;
  }
  W->bar_arrived = 0;
  if (waiter->bar_op == B_GRID) {  // the fibers stay parked until the scheduler has passed the grid barrier
    W->grid_wait = true;
    return;
  }
  switch (waiter->bar_op) {
    case B_COUNT: W->bar_result = count; break;
    case B_AND: W->bar_result = count == W->nthreads; break;
    case B_OR: W->bar_result = count > 0; break;
    default: W->bar_result = 0;
  }
  for (int i = 0; i < W->nthreads; ++i) {
    W->fibers[i].state = F_READY;
    rq_push(W, i);
  }
}

int syncthreads(int op, int pred, const char* file, int line) {
  Fiber* f = tls.fiber;
  if (!f) { fprintf(stderr, "cuda_cpu: %s called outside a kernel (%s:%d)\n", barrier_name(op), file, line); abort(); }
  Worker* W = f->w;
  f->state = F_BAR;
  f->bar_file = file;
  f->bar_line = line;
  f->bar_op = op;
  f->bar_pred = pred != 0;
  W->bar_arrived++;
  check_barrier(W);
  switch_out(f);
  return W->bar_result;
}

// ------------------------------------------------------------------ grid barrier (cooperative launches)
int launch_is_cooperative() {
  Fiber* f = tls.fiber;
  return f && f->w->L && f->w->L->coop;
}

void grid_sync(const char* file, int line) {
  Fiber* f = tls.fiber;
  if (!f) { fprintf(stderr, "cuda_cpu: grid.sync() called outside a kernel (%s:%d)\n", file, line); abort(); }
  Worker* W = f->w;
  if (!W->L->coop) {
    failf(W, f,
          "grid.sync() at %s:%d in a non-cooperative launch: grid-wide synchronization needs a cooperative launch "
          "(cooperative=True, i.e. cudaLaunchCooperativeKernel); on the GPU this is undefined behaviour",
          file, line);
    park_forever(f);
  }
  syncthreads(B_GRID, 0, file, line);
}

// Called from the scheduler context (no fiber current, so the watchdog leaves this thread alone) once every
// thread of the block waits at grid.sync().  Returns false if the launch failed meanwhile.
static bool grid_arrive(Worker* W) {
  GridBarrier& G = W->L->gb;
  const Fiber* w0 = &W->fibers[0];
  std::unique_lock<std::mutex> lk(G.mu);
  if (G.exited) {
    failf(W, nullptr,
          "grid barrier divergence: this block waits at grid.sync() %s:%d, but block (%u,%u,%u) has already "
          "exited (every block must call grid.sync() equally often)",
          w0->bar_file, w0->bar_line, G.first_exited.x, G.first_exited.y, G.first_exited.z);
    return false;
  }
  if (G.arrived == 0) {
    G.file = w0->bar_file;
    G.line = w0->bar_line;
    G.first_waiter = W->bidx;
  }
  if (++G.arrived == G.nblocks) {
    g_core->phase();
    G.arrived = 0;
    G.gen++;
    G.cv.notify_all();
    return true;
  }
  const uint64_t gen = G.gen;
  while (G.gen == gen) {
    if (g_failed.load()) {  // another block failed (its message is the one reported)
      W->error = true;
      return false;
    }
    G.cv.wait_for(lk, std::chrono::milliseconds(2));
  }
  return true;
}

static void grid_block_exited(Worker* W) {
  GridBarrier& G = W->L->gb;
  std::lock_guard<std::mutex> lk(G.mu);
  if (G.exited++ == 0) G.first_exited = W->bidx;
  if (G.arrived > 0)
    failf(W, nullptr,
          "grid barrier divergence: this block exited while %d other block(s) wait at grid.sync() %s:%d (e.g. "
          "block (%u,%u,%u)); every thread of every block must reach each grid.sync()",
          G.arrived, G.file, G.line, G.first_waiter.x, G.first_waiter.y, G.first_waiter.z);
}

void yield() {
  Fiber* f = tls.fiber;
  if (!f) return;
  f->state = F_READY;
  rq_push(f->w, f->linear);
  switch_out(f);
}

[[noreturn]] void trap(const char* what, const char* file, int line) {
  Fiber* f = tls.fiber;
  if (!f) { fprintf(stderr, "cuda_cpu: %s outside a kernel at %s:%d\n", what, file, line); abort(); }
  failf(f->w, f, "%s at %s:%d", what, file, line);
  park_forever(f);
}

// ------------------------------------------------------------------ undefined-behaviour checks
// Kernels are compiled with -fsanitize=alignment,bounds -fno-sanitize-recover: the compiler calls these
// handlers (the libubsan ABI, defined here instead of linking libubsan) with the exact site and types.
struct UbLoc { const char* file; unsigned line, col; };
struct UbType { unsigned short kind, info; char name[1]; };
struct UbTypeMismatch { UbLoc loc; const UbType* type; unsigned char log_align, check_kind; };
struct UbOutOfBounds { UbLoc loc; const UbType* array_type; const UbType* index_type; };

[[noreturn]] static void ub_fail(const UbLoc& loc, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
[[noreturn]] static void ub_fail(const UbLoc& loc, const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  Fiber* f = tls.fiber;
  if (!f) { fprintf(stderr, "cuda_cpu: %s at %s:%u outside a kernel\n", msg, loc.file, loc.line); abort(); }
  failf(f->w, f, "%s at %s:%u:%u", msg, loc.file, loc.line, loc.col);
  park_forever(f);
}
static long long ub_index(const UbType* t, uintptr_t v) {  // integer ValueHandle: inline when <= 64 bits
  const unsigned bits = 1u << (t->info >> 1);
  if (!(t->info & 1) || bits >= 64) return (long long)v;
  const int sh = 64 - (int)bits;
  return (long long)(v << sh) >> sh;
}
static void ub_type_mismatch(UbTypeMismatch* d, uintptr_t p) {
  static const char* kinds[] = {"load of", "store to", "reference binding to", "member access within",
                                "member call on", "constructor call on", "downcast of", "downcast of", "upcast of",
                                "cast to virtual base of", "_Nonnull binding to", "dynamic operation on"};
  const char* k = d->check_kind < 12 ? kinds[d->check_kind] : "access to";
  const unsigned long align = 1ul << d->log_align;
  if (!p) ub_fail(d->loc, "%s null pointer of type %s", k, d->type->name);
  ub_fail(d->loc,
          "misaligned address: %s %p (%lu bytes past a multiple of %lu), which type %s requires (\"misaligned "
          "address\" on the GPU; a vector access at an unaligned element offset?)",
          k, (void*)p, (unsigned long)(p % align), align, d->type->name);
}
static void ub_out_of_bounds(UbOutOfBounds* d, uintptr_t index) {
  ub_fail(d->loc, "index %lld out of bounds for type %s", ub_index(d->index_type, index), d->array_type->name);
}

unsigned activemask() {  // approximation: all non-exited lanes of the warp
  Fiber* f = tls.fiber;
  if (!f) return 0;
  WarpState& ws = f->w->warps[f->warp];
  return ws.exists & ~ws.exited;
}

// ------------------------------------------------------------------ warp operations
static const char* warp_name(int k) {
  static const char* n[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                            "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp",
                            "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync", "__reduce_min_sync",
                            "__reduce_max_sync", "__match_any_sync"};
  return (k >= 0 && k <= W_MATCH_ANY) ? n[k] : "?";
}
static int shfl_src(int kind, int lane, int b, int width) {  // PTX shfl.sync clamp semantics
  int segmask = 32 - width;
  int minLane = lane & segmask;
  int maxLane = minLane | ((kind == W_SHFL_UP ? 0 : 31) & ~segmask);
  int j;
  bool ok;
  switch (kind) {
    case W_SHFL_IDX: j = (b & ~segmask) | minLane; ok = j <= maxLane; break;
    case W_SHFL_UP: j = lane - b; ok = j >= maxLane; break;
    case W_SHFL_DOWN: j = lane + b; ok = j <= maxLane; break;
    default: j = lane ^ b; ok = j <= maxLane; break;
  }
  return ok ? j : lane;
}
static void complete_warp(Worker* W, int warp, const WarpOp* op, Fiber* trigger) {
  const unsigned m = op->mask;
  Fiber* base = &W->fibers[warp * 32];
  for (unsigned r = m; r; r &= r - 1) {
    int l = __builtin_ctz(r);
    const WarpOp* o = base[l].wop;
    if (o->kind != op->kind || o->mask != m || o->size != op->size) {
      failf(W, trigger,
            "warp-synchronous mismatch in warp %d: lane %d is at %s(mask 0x%08x) %s:%d but lane %d is at "
            "%s(mask 0x%08x) %s:%d",
            warp, trigger->lane, warp_name(op->kind), m, op->file, op->line, l, warp_name(o->kind), o->mask,
            o->file, o->line);
      return;
    }
  }
  switch (op->kind) {
    case W_SHFL_IDX: case W_SHFL_UP: case W_SHFL_DOWN: case W_SHFL_XOR:
      for (unsigned r = m; r; r &= r - 1) {
        int l = __builtin_ctz(r);
        WarpOp* o = base[l].wop;
        int src = shfl_src(o->kind, l, o->param, o->width);
        if (src >= 0 && src < 32 && ((m >> src) & 1u)) memcpy(o->out, base[src].wop->in, 8);
        else memset(o->out, 0xff, 8);  // source lane not participating: undefined on the GPU
      }
      break;
    case W_BALLOT: case W_ANY: case W_ALL: {
      unsigned b = 0;
      for (unsigned r = m; r; r &= r - 1) {
        int l = __builtin_ctz(r);
        unsigned v;
        memcpy(&v, base[l].wop->in, 4);
        if (v) b |= 1u << l;
      }
      unsigned res = op->kind == W_BALLOT ? b : op->kind == W_ANY ? (b != 0) : (b == m);
      for (unsigned r = m; r; r &= r - 1) memcpy(base[__builtin_ctz(r)].wop->out, &res, 4);
      break;
    }
    case W_REDUCE_ADD: case W_REDUCE_MIN: case W_REDUCE_MAX: case W_REDUCE_UMIN: case W_REDUCE_UMAX: {
      unsigned acc_u = 0;
      int acc_i = 0;
      bool first = true;
      for (unsigned r = m; r; r &= r - 1) {
        unsigned v;
        memcpy(&v, base[__builtin_ctz(r)].wop->in, 4);
        int vi = (int)v;
        if (first) { acc_u = v; acc_i = vi; first = false; continue; }
        switch (op->kind) {
          case W_REDUCE_ADD: acc_u += v; break;
          case W_REDUCE_UMIN: acc_u = v < acc_u ? v : acc_u; break;
          case W_REDUCE_UMAX: acc_u = v > acc_u ? v : acc_u; break;
          case W_REDUCE_MIN: acc_i = vi < acc_i ? vi : acc_i; break;
          default: acc_i = vi > acc_i ? vi : acc_i; break;
        }
      }
      if (op->kind == W_REDUCE_MIN || op->kind == W_REDUCE_MAX) acc_u = (unsigned)acc_i;
      for (unsigned r = m; r; r &= r - 1) memcpy(base[__builtin_ctz(r)].wop->out, &acc_u, 4);
      break;
    }
    case W_MATCH_ANY:
      for (unsigned r = m; r; r &= r - 1) {
        int l = __builtin_ctz(r);
        unsigned same = 0;
        for (unsigned q = m; q; q &= q - 1) {
          int k = __builtin_ctz(q);
          if (!memcmp(base[k].wop->in, base[l].wop->in, 8)) same |= 1u << k;
        }
        memcpy(base[l].wop->out, &same, 4);
        memset(base[l].wop->out + 4, 0, 4);
      }
      break;
    default: break;  // __syncwarp
  }
  W->warps[warp].waiting &= ~m;
  for (unsigned r = m; r; r &= r - 1) {
    int l = __builtin_ctz(r);
    base[l].state = F_READY;
    rq_push(W, warp * 32 + l);
  }
}

void warp_op(WarpOp* op) {
  Fiber* f = tls.fiber;
  if (!f) { fprintf(stderr, "cuda_cpu: %s called outside a kernel\n", warp_name(op->kind)); abort(); }
  Worker* W = f->w;
  WarpState& ws = W->warps[f->warp];
  const unsigned bit = 1u << f->lane;
  if (!(op->mask & bit)) {
    failf(W, f, "%s at %s:%d: calling lane %d is not in mask 0x%08x (undefined behaviour)", warp_name(op->kind),
          op->file, op->line, f->lane, op->mask);
    park_forever(f);
  }
  if (op->mask & ~ws.exists) {
    failf(W, f, "%s at %s:%d: mask 0x%08x names lanes 0x%08x that do not exist (block of %d threads)",
          warp_name(op->kind), op->file, op->line, op->mask, op->mask & ~ws.exists, W->nthreads);
    park_forever(f);
  }
  if (op->mask & ws.exited) {
    failf(W, f, "%s at %s:%d: mask 0x%08x names lanes 0x%08x that have already exited", warp_name(op->kind),
          op->file, op->line, op->mask, op->mask & ws.exited);
    park_forever(f);
  }
  if (op->kind <= W_SHFL_XOR && (op->width < 1 || op->width > 32 || (op->width & (op->width - 1)))) {
    failf(W, f, "%s at %s:%d: width %d is not a power of two <= 32", warp_name(op->kind), op->file, op->line,
          op->width);
    park_forever(f);
  }
  f->wop = op;
  f->state = F_WARP;
  ws.waiting |= bit;
  if ((ws.waiting & op->mask) == op->mask) complete_warp(W, f->warp, op, f);
  switch_out(f);
}

static void on_exit(Worker* W, Fiber* f) {
  f->state = F_EXIT;
  W->nexited++;
  if (W->first_exited < 0) W->first_exited = f->linear;
  WarpState& ws = W->warps[f->warp];
  const unsigned bit = 1u << f->lane;
  ws.exited |= bit;
  for (unsigned r = ws.waiting; r; r &= r - 1) {
    int l = __builtin_ctz(r);
    const WarpOp* o = W->fibers[f->warp * 32 + l].wop;
    if (o->mask & bit) {
      failf(W, f, "warp divergence: this thread (lane %d) exited while lane %d waits at %s(mask 0x%08x) %s:%d",
            f->lane, l, warp_name(o->kind), o->mask, o->file, o->line);
      return;
    }
  }
  check_barrier(W);
}

static void diagnose_deadlock(Worker* W) {
  char buf[2048];
  size_t n = 0;
  int nbar = 0, nwarp = 0;
  auto add = [&](const char* fmt, auto... a) {  // append, never past the end of buf
    if (n < sizeof buf) n += (size_t)std::max(0, snprintf(buf + n, sizeof buf - n, fmt, a...));
  };
  const Fiber* fb = nullptr;
  const Fiber* fw = nullptr;
  for (int i = 0; i < W->nthreads; ++i) {
    const Fiber* f = &W->fibers[i];
    if (f->state == F_BAR) { nbar++; if (!fb) fb = f; }
    if (f->state == F_WARP) { nwarp++; if (!fw) fw = f; }
  }
  add("deadlock (no runnable thread): %d exited", W->nexited);
  if (fb)
    add("; %d wait at %s %s:%d (e.g. thread (%u,%u,%u))", nbar, barrier_name(fb->bar_op), fb->bar_file,
        fb->bar_line, fb->tid.x, fb->tid.y, fb->tid.z);
  if (fw) {
    const WarpOp* o = fw->wop;
    unsigned miss = o->mask & ~W->warps[fw->warp].waiting;
    add("; %d wait at warp operations, e.g. warp %d lane %d at %s(mask 0x%08x) %s:%d", nwarp, fw->warp, fw->lane,
        warp_name(o->kind), o->mask, o->file, o->line);
    if (miss) {
      int l = __builtin_ctz(miss);
      const Fiber* g = &W->fibers[fw->warp * 32 + l];
      const char* where = g->state == F_BAR ? "a block barrier" : g->state == F_EXIT ? "exit" : "another warp op";
      add(" whose lane %d is at %s", l, where);
      if (g->state == F_BAR) add(" (%s:%d)", g->bar_file, g->bar_line);
      if (g->state == F_WARP)
        add(" (%s mask 0x%08x %s:%d)", warp_name(g->wop->kind), g->wop->mask, g->wop->file, g->wop->line);
    }
  }
  failf(W, nullptr, "%s", buf);
}

// ------------------------------------------------------------------ blocks
static bool run_block(Worker* W, uint64_t blin) {
  const LaunchDesc& d = *W->desc;
  const uint64_t gx = d.grid.x, gy = d.grid.y;
  W->bidx = uint3{(unsigned)(blin % gx), (unsigned)((blin / gx) % gy), (unsigned)(blin / (gx * gy))};
  tls.block_idx = W->bidx;
  tls.block_dim = d.block;
  tls.grid_dim = d.grid;
  tls.worker = W;
  if (g_cfg.poison) poison_shared(W, d.dyn_smem);
  const int n = (int)(d.block.x * d.block.y * d.block.z);
  W->nthreads = n;
  W->nexited = 0;
  W->bar_arrived = 0;
  W->first_exited = -1;
  W->grid_wait = false;
  W->error = false;
  W->rq_head = 0;
  W->rq_count = 0;
  W->randomize = W->L->seed != 0;
  uint64_t s = W->L->seed ^ (blin * 0x9e3779b97f4a7c15ull) ^ 0x5bd1e995ull;
  W->rng = splitmix(s) | 1;
  for (int w = 0; w < (n + 31) / 32; ++w) {
    int lanes = n - 32 * w < 32 ? n - 32 * w : 32;
    W->warps[w].exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    W->warps[w].exited = 0;
    W->warps[w].waiting = 0;
  }
  for (int i = 0; i < n; ++i) {
    Fiber* f = &W->fibers[i];
    f->tid = uint3{(unsigned)(i % d.block.x), (unsigned)((i / d.block.x) % d.block.y),
                   (unsigned)(i / (d.block.x * d.block.y))};
    f->linear = i;
    f->lane = i & 31;
    f->warp = i >> 5;
    f->state = F_READY;
    f->wop = nullptr;
    f->bar_file = "";
    f->bar_line = 0;
    init_fiber(f);
    rq_push(W, i);
  }
  while (!W->error) {
    if (W->rq_count == 0) {
      if (W->grid_wait) {
        W->grid_wait = false;
        if (!grid_arrive(W)) break;
        for (int i = 0; i < n; ++i)
          if (W->fibers[i].state == F_BAR) {
            W->fibers[i].state = F_READY;
            rq_push(W, i);
          }
        continue;
      }
      if (W->nexited == n) break;
      diagnose_deadlock(W);
      break;
    }
    resume(W, &W->fibers[rq_pop(W)]);
  }
  tls.fiber = nullptr;
  for (int i = 0; i < n && !W->error; ++i)
    if (!canary_ok(&W->fibers[i]))
      failf(W, &W->fibers[i], "fiber stack overflow (stack %zu bytes; raise stack_kb)", g_cfg.stack_bytes);
  if (!W->error && W->L->coop) grid_block_exited(W);
  return !W->error;
}

static void worker_main(int index, LaunchCtx* L) {
  Worker* W = get_worker(index);  // already created by run_launch
  W->desc = L->d;
  W->L = L;
  W->resumes = 0;
  stack_t old_altstack;
  const bool own_altstack = enter_altstack(W, &old_altstack);
  locate_tls(W);
  uint64_t nblk = 0;
  if (L->coop) {  // exactly one block per OS thread: all blocks are co-resident
    if (run_block(W, L->order[index])) nblk++;
  } else {
    for (;;) {
      if (g_failed.load(std::memory_order_relaxed)) break;
      uint64_t i = L->next.fetch_add(1);
      if (i >= L->order.size()) break;
      if (!run_block(W, L->order[i])) break;
      nblk++;
    }
  }
  g_stat_resumes += W->resumes;
  g_stat_blocks += nblk;
  tls.worker = nullptr;
  if (own_altstack) leave_altstack(&old_altstack);
}

// ------------------------------------------------------------------ memory core: regions, guard pages, traffic
struct Region {
  uintptr_t base = 0;
  size_t bytes = 0, npages = 0;
  int live = 0, tracked = 0;
  volatile int armed = 0;
  unsigned char* state = nullptr;  // per page: 1 = read fault seen, 2 = write fault seen
  uint64_t last_read = 0, last_write = 0, last_touched_pages = 0, last_touched_bytes = 0;
};
static constexpr int kMaxRegions = 16384;
static Region g_regions[kMaxRegions];
static std::atomic<int> g_region_hwm{0};
// Held from launch_begin to launch_end, and by alloc, free and track: the region table, the protections a launch
// sets and the memory behind them stay as they are while kernels run (a finalizer that frees an array in another
// thread waits for the launch).
static std::mutex g_core_launch_mu;
static int g_track = 0;  // arm the tracked regions at each launch
static std::atomic<uint64_t> g_stat_faults{0};
static std::atomic<int> g_guards_left{12288};  // stacks with a guard page, all modules together

static int core_take_guards(int n) {
  int have = g_guards_left.load();
  int take;
  do {
    take = std::max(0, std::min(n, have));
  } while (!g_guards_left.compare_exchange_weak(have, have - take));
  return take;
}
static void core_give_guards(int n) { g_guards_left += n; }

static int core_classify(uintptr_t a, int write, char* msg, size_t n) {
  const int hwm = g_region_hwm.load(std::memory_order_acquire);
  for (int i = 0; i < hwm; ++i) {
    Region& r = g_regions[i];
    if (!r.live) continue;
    const uintptr_t end = r.base + r.npages * kPage;
    if (a >= r.base && a < end && r.armed) {
      size_t p = (a - r.base) / kPage;
      __atomic_or_fetch(&r.state[p], write ? 2 : 1, __ATOMIC_RELAXED);
      mprotect((void*)(r.base + p * kPage), kPage, write ? (PROT_READ | PROT_WRITE) : PROT_READ);
      g_stat_faults.fetch_add(1, std::memory_order_relaxed);
      return 1;
    }
    if (a >= end && a < end + kPage) {
      snprintf(msg, n, "out-of-bounds %s at buffer #%d + %zu bytes (buffer is %zu bytes)",
               write ? "write" : "read", i, (size_t)(a - r.base), r.bytes);
      return 0;
    }
    if (a >= r.base - kPage && a < r.base) {
      snprintf(msg, n, "out-of-bounds %s at buffer #%d - %zu bytes (buffer is %zu bytes)",
               write ? "write" : "read", i, (size_t)(r.base - a), r.bytes);
      return 0;
    }
  }
  return 0;
}

static void core_launch_begin() {
  g_core_launch_mu.lock();
  if (!g_track) return;
  int hwm = g_region_hwm.load();
  for (int i = 0; i < hwm; ++i) {
    Region& r = g_regions[i];
    if (!r.live || !r.tracked) continue;
    memset(r.state, 0, r.npages);
    r.last_read = r.last_write = r.last_touched_pages = r.last_touched_bytes = 0;
    r.armed = 1;
    mprotect((void*)r.base, r.npages * kPage, PROT_NONE);
  }
}
// Add the pages touched since the last arming to the launch's totals.
static void fold(Region& r) {
  for (size_t p = 0; p < r.npages; ++p) {
    unsigned char s = r.state[p];
    if (!s) continue;
    r.last_read += (s & 1) != 0;
    r.last_write += (s & 2) != 0;
    r.last_touched_pages++;
    size_t lo = p * kPage, hi = lo + kPage < r.bytes ? lo + kPage : r.bytes;
    r.last_touched_bytes += hi > lo ? hi - lo : 0;
  }
  memset(r.state, 0, r.npages);
}
// Called by the last block to arrive at a grid barrier, while every other block waits: no kernel code runs.
static void core_phase() {
  int hwm = g_region_hwm.load();
  for (int i = 0; i < hwm; ++i) {
    Region& r = g_regions[i];
    if (!r.live || !r.armed) continue;
    fold(r);
    mprotect((void*)r.base, r.npages * kPage, PROT_NONE);
  }
}
static void core_launch_end() {
  int hwm = g_region_hwm.load();
  for (int i = 0; i < hwm; ++i) {
    Region& r = g_regions[i];
    if (!r.live || !r.armed) continue;
    mprotect((void*)r.base, r.npages * kPage, PROT_READ | PROT_WRITE);
    r.armed = 0;
    fold(r);
  }
  g_core_launch_mu.unlock();
}

// ------------------------------------------------------------------ fault and watchdog signals
// A fiber that faulted, or that the watchdog interrupted, is redirected here, on its own stack and out of
// signal context: the fiber arrives in the first argument register (never from a thread_local, which can name
// another fiber while the scheduler switches).
extern "C" void cc_fault_exit(Fiber* f) {
  f->w->error = true;
  park_forever(f);
}

static void redirect_to_exit(Fiber* f, ucontext_t* uc) {
  uintptr_t sp = ((uintptr_t)f->stack_hi - 512) & ~(uintptr_t)15;
  uc->uc_mcontext.gregs[REG_RSP] = (greg_t)(sp - 8);
  uc->uc_mcontext.gregs[REG_RDI] = (greg_t)f;
  uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(void*)&cc_fault_exit;
}

// The module's part of a signal that landed on one of its workers' fiber stacks (found by the core from the
// interrupted stack pointer; see the file comment).  Runs in the signal handler: no thread_local, no lock.
static void fiber_signal(void* worker, uintptr_t sp, int sig, siginfo_t* si, ucontext_t* uc, const char* found) {
  Worker* W = static_cast<Worker*>(worker);
  const size_t per = W->stack_bytes + kPage;  // guard page + stack of one fiber (see ensure_stacks)
  Fiber* f = &W->fibers[(sp - (uintptr_t)W->stack_mem) / per];
  if (sig == SIGUSR2) {
    failf(W, f,
          "watchdog: launch still running after %lld ms; this thread has not reached a barrier or exited (a "
          "spin-wait on another block, or on a thread of its own block that cannot run? fibers are not "
          "preempted, and blocks are co-resident only in cooperative launches or across workers)",
          g_cfg.timeout_ms);
    redirect_to_exit(f, uc);
    return;
  }
  const uintptr_t a = (uintptr_t)si->si_addr;
  const bool write = (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0;
  char msg[512];
  if (found && found[0])
    snprintf(msg, sizeof msg, "%s", found);
  else if (sig == SIGILL)
    snprintf(msg, sizeof msg, "illegal instruction (a trap)");
  else if (sig == SIGFPE)
    snprintf(msg, sizeof msg, "arithmetic exception (integer division by zero?)");
  else if (sig == SIGSEGV && a == 0 && si->si_code == SI_KERNEL)
    snprintf(msg, sizeof msg, "general protection fault (misaligned vector access or wild pointer)");
  else if (a >= (uintptr_t)f->stack_lo - kPage && a < (uintptr_t)f->stack_lo)
    snprintf(msg, sizeof msg, "fiber stack overflow (stack %zu bytes; raise stack_kb)", g_cfg.stack_bytes);
  else
    snprintf(msg, sizeof msg, "invalid %s at address %p (not inside any emulator buffer)", write ? "write" : "read",
             (void*)a);
  // The faulting instruction is named "[pc <library>+0x<offset>]" by run_launch, after the workers are done
  // (dladdr takes the loader's lock: not in a signal handler).
  if (failf(W, f, "%s", msg)) g_fault_pc.store((uintptr_t)uc->uc_mcontext.gregs[REG_RIP]);
  redirect_to_exit(f, uc);
}

// ---- the core's part: the one handler of the process, and the table of fiber-stack spans it searches.
struct Span {
  std::atomic<uintptr_t> lo{0}, hi{0};  // hi == 0: free slot; written last on add, first on remove
  std::atomic<void*> worker{nullptr};
  std::atomic<SpanFn> fn{nullptr};
};
static constexpr int kMaxSpans = 8192;  // one per worker of every module (a cooperative launch: one per block)
static Span g_spans[kMaxSpans];
static std::atomic<int> g_span_hwm{0};
static std::mutex g_span_mu;

static int core_add_span(uintptr_t lo, uintptr_t hi, void* worker, SpanFn fn) {
  std::lock_guard<std::mutex> lk(g_span_mu);
  int hwm = g_span_hwm.load();
  int slot = 0;
  while (slot < hwm && g_spans[slot].hi.load()) slot++;
  if (slot == kMaxSpans) return -1;
  Span& s = g_spans[slot];
  s.worker.store(worker);
  s.fn.store(fn);
  s.lo.store(lo);
  s.hi.store(hi, std::memory_order_release);
  if (slot == hwm) g_span_hwm.store(hwm + 1, std::memory_order_release);
  return slot;
}
static void core_remove_span(int slot) {
  if (slot < 0) return;
  std::lock_guard<std::mutex> lk(g_span_mu);
  g_spans[slot].hi.store(0, std::memory_order_release);
}

static struct sigaction g_prev_fault[4];
static struct sigaction g_prev_usr2;
static const int kFaultSigs[4] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
static std::once_flag g_install_once;

static void chain(const struct sigaction& prev, int sig, siginfo_t* si, void* ucv, bool fatal) {
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction) { prev.sa_sigaction(sig, si, ucv); return; }
  } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
    prev.sa_handler(sig);
    return;
  }
  if (fatal) signal(sig, SIG_DFL);  // not ours: returning re-executes the faulting instruction -> default action
}

// Faults and the watchdog's nudges: a tracked page first touched (traffic counting) is opened and the access
// retried; a signal whose interrupted stack pointer lies in a registered fiber-stack span (a guard page below a
// stack included) goes to that module; anything else is not the emulator's and goes to the previous handler
// (for a fault: CPython's faulthandler, then the default action).
static void on_signal(int sig, siginfo_t* si, void* ucv) {
  ucontext_t* uc = (ucontext_t*)ucv;
  char msg[512];
  msg[0] = 0;
  if (sig == SIGSEGV &&
      core_classify((uintptr_t)si->si_addr, (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0, msg, sizeof msg))
    return;
  const uintptr_t sp = (uintptr_t)uc->uc_mcontext.gregs[REG_RSP];
  const int hwm = g_span_hwm.load(std::memory_order_acquire);
  for (int i = 0; i < hwm; ++i) {
    Span& s = g_spans[i];
    const uintptr_t hi = s.hi.load(std::memory_order_acquire);
    if (hi && sp < hi && sp >= s.lo.load()) {
      s.fn.load()(s.worker.load(), sp, sig, si, uc, msg);
      return;
    }
  }
  if (sig == SIGUSR2) {  // lands outside a fiber (the scheduler, a grid barrier): the watchdog nudges again
    chain(g_prev_usr2, sig, si, ucv, false);
    return;
  }
  int slot = 0;
  while (kFaultSigs[slot] != sig) slot++;
  chain(g_prev_fault[slot], sig, si, ucv, true);
}

static void core_install() {
  std::call_once(g_install_once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, &g_prev_usr2);
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    for (int i = 0; i < 4; ++i) sigaction(kFaultSigs[i], &sa, &g_prev_fault[i]);
  });
}

// Names the faulting instruction of the launch's error as "[pc <library>+0x<offset>]" (the Python side turns
// it into file:line), out of signal context.
static void name_fault_pc() {
  const uintptr_t pc = g_fault_pc.exchange(0);
  Dl_info info;
  if (!pc || !dladdr((void*)pc, &info) || !info.dli_fname) return;
  const size_t n = strlen(g_errbuf);
  snprintf(g_errbuf + n, sizeof g_errbuf - n, " [pc %s+0x%lx]", info.dli_fname,
           (unsigned long)(pc - (uintptr_t)info.dli_fbase));
}

}  // namespace detail

// ------------------------------------------------------------------ launch
int run_launch(const LaunchDesc& d) {
  using namespace detail;
  std::lock_guard<std::mutex> lk(g_launch_mu);
  g_failed = false;
  g_errbuf[0] = 0;
  g_fault_pc = 0;
  g_core->install();
  const uint64_t nthreads = (uint64_t)d.block.x * d.block.y * d.block.z;
  const uint64_t nblocks = (uint64_t)d.grid.x * d.grid.y * d.grid.z;
  if (nthreads == 0 || nthreads > (uint64_t)kMaxThreads || d.block.x > 1024 || d.block.y > 1024 || d.block.z > 64 ||
      nblocks == 0 || d.grid.x > 0x7fffffffu || d.grid.y > 65535 || d.grid.z > 65535) {
    failf(nullptr, nullptr, "[%s] invalid configuration argument: grid (%u,%u,%u) block (%u,%u,%u)", d.name,
          d.grid.x, d.grid.y, d.grid.z, d.block.x, d.block.y, d.block.z);
    return 1;
  }
  if (d.dyn_smem > kMaxDynSmem) {
    failf(nullptr, nullptr, "[%s] dynamic shared memory %zu bytes exceeds %zu", d.name, d.dyn_smem, kMaxDynSmem);
    return 1;
  }
  if (d.cooperative && nblocks > (uint64_t)std::max(1, g_cfg.max_coop_blocks)) {
    failf(nullptr, nullptr,
          "[%s] too many blocks in cooperative launch (cudaErrorCooperativeLaunchTooLarge): %llu blocks, but at most "
          "%d can be co-resident here (set(max_coop_blocks=...))",
          d.name, (unsigned long long)nblocks, g_cfg.max_coop_blocks);
    return 1;
  }
  LaunchCtx L;
  L.d = &d;
  L.coop = d.cooperative != 0;
  L.seed = d.has_seed ? d.seed : g_cfg.seed;
  L.gb.nblocks = (int)(L.coop ? nblocks : 0);
  L.order.resize(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) L.order[i] = i;
  if (L.seed) {  // random block order
    uint64_t s = L.seed * 0xd1342543de82ef95ull + nblocks;
    uint64_t r = splitmix(s) | 1;
    for (uint64_t i = nblocks - 1; i > 0; --i) {
      uint64_t j = xs64(r) % (i + 1);
      std::swap(L.order[i], L.order[j]);
    }
  }
  int nw = L.coop ? (int)nblocks : std::max(1, g_cfg.workers);
  if ((uint64_t)nw > nblocks) nw = (int)nblocks;
  for (int i = 0; i < nw; ++i) {  // workers and their stacks, before any thread starts (single-threaded)
    if (!ensure_stacks(get_worker(i), (int)nthreads)) {
      failf(nullptr, nullptr, "[%s] cannot map fiber stacks for %d workers x %llu threads", d.name, nw,
            (unsigned long long)nthreads);
      return 1;
    }
  }
  g_core->launch_begin();
  double t1 = now_ns();
  // Watchdog state: only threads still marked running are signalled.
  std::vector<pthread_t> tids(nw);
  std::vector<char> running(nw, 1);
  std::mutex wd_mu;
  std::condition_variable wd_cv;
  bool done = false;
  std::thread watchdog;
  auto nudge = [&] {
    for (int i = 0; i < nw; ++i)
      if (running[i]) pthread_kill(tids[i], SIGUSR2);
  };
  auto start_watchdog = [&] {
    if (g_cfg.timeout_ms <= 0) return;
    watchdog = std::thread([&] {
      std::unique_lock<std::mutex> lk(wd_mu);
      if (!wd_cv.wait_for(lk, std::chrono::milliseconds(g_cfg.timeout_ms), [&] { return done; })) {
        nudge();
        // keep nudging: a signal that lands outside a fiber (scheduler code, grid barrier) is ignored
        while (!wd_cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return done; })) nudge();
      }
    });
  };
  auto worker = [&](int i) {
    worker_main(i, &L);
    std::lock_guard<std::mutex> lk(wd_mu);
    running[i] = 0;
  };
  if (nw == 1) {
    tids[0] = pthread_self();
    start_watchdog();
    worker(0);
  } else {
    std::vector<std::thread> ts;
    {
      std::lock_guard<std::mutex> lk(wd_mu);  // tids[] complete before any worker can clear running[]
      for (int i = 0; i < nw; ++i) {
        ts.emplace_back(worker, i);
        tids[i] = ts.back().native_handle();
      }
    }
    start_watchdog();
    for (auto& t : ts) t.join();
  }
  {
    std::lock_guard<std::mutex> lk(wd_mu);
    done = true;
  }
  wd_cv.notify_all();
  if (watchdog.joinable()) watchdog.join();
  double t2 = now_ns();
  g_core->launch_end();
  if (L.coop)  // the extra workers of a cooperative launch give their stacks (and guard pages) back
    for (int i = std::max(1, g_cfg.workers); i < (int)g_workers.size(); ++i) release_stacks(g_workers[i]);
  g_stat_run_ns += t2 - t1;
  g_stat_launches++;
  if (g_failed) name_fault_pc();
  return g_failed ? 1 : 0;
}

}  // namespace cuda_cpu

// ------------------------------------------------------------------ C API (ctypes)
using namespace cuda_cpu::detail;

extern "C" {
void __ubsan_handle_type_mismatch_v1(UbTypeMismatch* d, uintptr_t p) { ub_type_mismatch(d, p); }
void __ubsan_handle_type_mismatch_v1_abort(UbTypeMismatch* d, uintptr_t p) { ub_type_mismatch(d, p); }
void __ubsan_handle_out_of_bounds(UbOutOfBounds* d, uintptr_t i) { ub_out_of_bounds(d, i); }
void __ubsan_handle_out_of_bounds_abort(UbOutOfBounds* d, uintptr_t i) { ub_out_of_bounds(d, i); }
}

EXPORT const char* cuda_cpu_last_error() { return g_errbuf; }

EXPORT int cuda_cpu_set(const char* key, long long v) {
  std::lock_guard<std::mutex> lk(g_launch_mu);
  if (!strcmp(key, "seed")) g_cfg.seed = (uint64_t)v;
  else if (!strcmp(key, "workers")) g_cfg.workers = (int)std::max(1LL, std::min(v, 256LL));
  else if (!strcmp(key, "stack_kb")) g_cfg.stack_bytes = (size_t)std::max(16LL, v) << 10;
  else if (!strcmp(key, "poison")) g_cfg.poison = (int)v;
  else if (!strcmp(key, "timeout_ms")) g_cfg.timeout_ms = v;
  else if (!strcmp(key, "max_coop_blocks")) g_cfg.max_coop_blocks = (int)std::max(1LL, std::min(v, 1024LL));
  else if (!strcmp(key, "track")) g_track = (int)v;  // meaningful on the core module
  else return -1;
  return 0;
}

EXPORT long long cuda_cpu_get(const char* key) {
  if (!strcmp(key, "seed")) return (long long)g_cfg.seed;
  if (!strcmp(key, "workers")) return g_cfg.workers;
  if (!strcmp(key, "stack_kb")) return (long long)(g_cfg.stack_bytes >> 10);
  if (!strcmp(key, "poison")) return g_cfg.poison;
  if (!strcmp(key, "timeout_ms")) return g_cfg.timeout_ms;
  if (!strcmp(key, "max_coop_blocks")) return g_cfg.max_coop_blocks;
  if (!strcmp(key, "track")) return g_track;
  if (!strcmp(key, "resumes")) return (long long)g_stat_resumes.load();
  if (!strcmp(key, "blocks")) return (long long)g_stat_blocks.load();
  if (!strcmp(key, "launches")) return (long long)g_stat_launches.load();
  if (!strcmp(key, "run_ns")) return (long long)g_stat_run_ns;
  if (!strcmp(key, "faults")) return (long long)g_stat_faults.load();
  if (!strcmp(key, "guards_left")) return g_guards_left.load();
  return -1;
}

EXPORT void cuda_cpu_reset_stats() {
  g_stat_resumes = 0; g_stat_blocks = 0; g_stat_faults = 0; g_stat_launches = 0;
  g_stat_run_ns = 0;
}

// The memory core: every module but the core itself is bound to the core's table right after loading.
EXPORT const void* cuda_cpu_core() { return &g_local_core; }
EXPORT void cuda_cpu_bind_core(const void* core) { g_core = core ? (const CoreApi*)core : &g_local_core; }

// Page-aligned allocation with a PROT_NONE guard page before and after (catches running off either end;
// overruns into the unused tail of the last page are not caught).  MAP_NORESERVE: huge, mostly untouched
// buffers (64-bit indexing tests) cost only the pages a kernel touches.  Fresh pages read as zero.
EXPORT void* cuda_cpu_alloc(size_t bytes) {
  std::lock_guard<std::mutex> lk(g_core_launch_mu);
  g_core->install();
  size_t npages = (bytes + kPage - 1) / kPage;
  if (!npages) npages = 1;
  char* m = (char*)mmap(nullptr, (npages + 2) * kPage, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* p = m + kPage;
  mprotect(m, kPage, PROT_NONE);
  mprotect(p + npages * kPage, kPage, PROT_NONE);
  int hwm = g_region_hwm.load();
  int slot = -1;
  for (int i = 0; i < hwm; ++i)
    if (!g_regions[i].live) { slot = i; break; }
  if (slot < 0) {
    if (hwm == kMaxRegions) { munmap(m, (npages + 2) * kPage); return nullptr; }
    slot = hwm;
  }
  Region& r = g_regions[slot];
  r.state = (unsigned char*)calloc(npages, 1);
  r.base = (uintptr_t)p;
  r.bytes = bytes;
  r.npages = npages;
  r.tracked = 0;
  r.armed = 0;
  r.last_read = r.last_write = r.last_touched_pages = r.last_touched_bytes = 0;
  r.live = 1;
  if (slot == hwm) g_region_hwm.store(hwm + 1, std::memory_order_release);
  return p;
}

static int region_of(const void* ptr) {
  uintptr_t a = (uintptr_t)ptr;
  int hwm = g_region_hwm.load();
  for (int i = 0; i < hwm; ++i)
    if (g_regions[i].live && a >= g_regions[i].base && a < g_regions[i].base + g_regions[i].npages * kPage) return i;
  return -1;
}

EXPORT int cuda_cpu_region(const void* ptr) { return region_of(ptr); }

// out[0] = base address, out[1] = size in bytes of a live region
EXPORT int cuda_cpu_region_info(int region, unsigned long long* out) {
  if (region < 0 || region >= g_region_hwm.load() || !g_regions[region].live) return -1;
  out[0] = g_regions[region].base;
  out[1] = g_regions[region].bytes;
  return 0;
}

EXPORT void cuda_cpu_free(void* ptr) {
  std::lock_guard<std::mutex> lk(g_core_launch_mu);
  int i = region_of(ptr);
  if (i < 0) return;
  Region& r = g_regions[i];
  r.live = 0;
  munmap((void*)(r.base - kPage), (r.npages + 2) * kPage);
  free(r.state);
  r.state = nullptr;
}

EXPORT int cuda_cpu_track(int region, int on) {
  std::lock_guard<std::mutex> lk(g_core_launch_mu);
  if (region < 0 || region >= g_region_hwm.load() || !g_regions[region].live) return -1;
  g_regions[region].tracked = on;
  return 0;
}

// Pages of `region` touched by the most recent launch: out[0] read-faulted pages, out[1] written pages,
// out[2] touched pages, out[3] touched bytes (touched pages clipped to the buffer size).
EXPORT int cuda_cpu_region_traffic(int region, unsigned long long* out) {
  if (region < 0 || region >= g_region_hwm.load()) return -1;
  Region& r = g_regions[region];
  out[0] = r.last_read;
  out[1] = r.last_write;
  out[2] = r.last_touched_pages;
  out[3] = r.last_touched_bytes;
  return 0;
}
