// cudasim's runtime: launches, the block scheduler (each GPU thread a fiber), barriers, shared memory, the launch
// limits, the error path, the watchdog and the ThreadSanitizer annotations. See cudasim.h and README.md.
//
// A launch runs its blocks one after another (in the order TSCD_CUDASIM_ORDER asks for). A block's threads run as
// fibers on the calling thread: the scheduler resumes each runnable thread in turn (forward, reversed or shuffled),
// and a thread runs until it exits or reaches __syncthreads(); when no thread can run, either all have exited
// (the block is done) or all wait at the same barrier (they are released together), anything else is divergence.
//
// Under ThreadSanitizer (built with -DCUDASIM_TSAN, kernels compiled with -fsanitize=thread) every GPU thread is a
// TSan fiber and only these count as synchronisation: the launch (the host's work happens before every thread),
// __syncthreads() (the arrivals of a block happen before its departures), the atomics (atomic accesses) and
// __threadfence() (over-approximated as a release + acquire of one global object), and the kernel's end (every
// thread happens before the host's next step). Switching fibers itself is not synchronisation. TSan fibers are
// expensive to create, so they are pooled: block number s of a launch (in execution order) uses the fibers of
// group s mod kTsanGroups, and two blocks of a group are ordered (a race between the same thread index of two
// such blocks is not seen; races within a block and between neighbouring blocks are).
#include "cudasim.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#ifdef CUDASIM_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#define CUDASIM_TSAN_ONLY(x) x
#else
#define CUDASIM_TSAN_ONLY(x)
#endif

namespace cudasim {
namespace {

#ifdef CUDASIM_TSAN
constexpr unsigned kTsanNoSync = 1;  // __tsan_switch_to_fiber_no_sync
constexpr int kTsanGroups = 4;
constexpr size_t kDefaultStack = 512 * 1024;
#else
constexpr int kTsanGroups = 1;
constexpr size_t kDefaultStack = 128 * 1024;
#endif
constexpr size_t kDefaultOptin = 232448;
constexpr int kMaxStatics = 64;  // H100 (sm_90): 227 KB of shared memory per block with the opt-in

// ------------------------------------------------------------------------------------------------ context switch
#if defined(__x86_64__)
// cudasim_switch(save, load): saves the callee-saved registers, MXCSR and the x87 control word on the current
// stack, stores the stack pointer in *save, and continues on the stack `load` (a stack saved the same way, or a
// new one prepared by prepare_stack).
extern "C" void cudasim_switch(void** save, void* load);
asm(R"(
  .text
  .globl cudasim_switch
  .hidden cudasim_switch
  .type cudasim_switch, @function
cudasim_switch:
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
  .size cudasim_switch, .-cudasim_switch
)");
#endif

extern "C" void cudasim_fiber_entry();

struct Fiber {
  char* stack = nullptr;  // mmap'd, a guard page at the low end
  size_t size = 0;
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
#ifdef CUDASIM_TSAN
  void* tsan = nullptr;
#endif
};

enum class Status { kReady, kBarrier, kDone };

struct ThreadState {
  uint3 idx;
  Status status;
  bool started;
  const char* bar_file;
  int bar_line;
  unsigned bar_generation;
  Fiber* fiber;
};

struct BlockState {
  uint3 idx;
  void* dyn_shared;
  // static __shared__ variables: carved by the first thread that uses one from an arena the host allocated with
  // the block (no allocation inside a GPU thread, which ThreadSanitizer would count as that thread's write)
  // (and no allocation at all there: keys are the declarations' string literals, in a fixed table)
  char* static_arena;
  const char* static_keys[kMaxStatics];
  void* static_ptrs[kMaxStatics];
  int num_statics;
  size_t static_bytes;
  char start_sync;       // TSan: the host's set-up of the block happens before its threads
  unsigned generation;   // barriers passed so far
  // TSan: a barrier's arrivals happen before its departures. Two objects, alternating per barrier: while some
  // threads are still departing barrier r (acquiring object r % 2), others already arrive at barrier r + 1
  // (releasing into the other object), and those later accesses must not be ordered before the stragglers'.
  char barrier_sync[2];
};

struct LaunchState {
  const char* name;
  const char* site;
  dim3 grid, block;
  size_t smem;
  size_t shared_limit;
  ThreadBody body;
  const void* ctx;
  BlockState* blk;
  ThreadState* cur;
  std::string failure;  // set by a thread (an exception) or by the scheduler (divergence)
  char* start_sync;     // TSan (heap, one per launch)
  char* end_sync;
};

// ------------------------------------------------------------------------------------------------ globals
thread_local LaunchState* tl_launch = nullptr;
thread_local void* tl_sched_sp = nullptr;
#if !defined(__x86_64__)
thread_local ucontext_t tl_sched_ctx;
#endif
#ifdef CUDASIM_TSAN
thread_local void* tl_sched_tsan = nullptr;
char g_fence_sync;
#endif
thread_local std::vector<std::unique_ptr<Fiber>> tl_fibers;  // the pool, per host thread: group * threads + thread

thread_local cudaError_t tl_error = cudaSuccess;
thread_local std::string tl_detail;

std::mutex g_mutex;  // the attribute table, knobs, launch log and order setting
std::unordered_map<const void*, int> g_max_dynamic_shared;
std::map<std::string, int64_t> g_knobs;
std::atomic<size_t> g_optin{kDefaultOptin};
std::string g_order_override;  // empty: TSCD_CUDASIM_ORDER
int64_t g_order_seed = 0;

struct LogEntry {
  std::string name, site, error;
  dim3 grid, block;
  size_t smem;
};
std::vector<LogEntry> g_log;
constexpr size_t kMaxLog = 200000;

// watchdog: the block running now and since when
std::atomic<bool> g_active{false};
std::atomic<int64_t> g_block_start_ns{0};
std::atomic<const char*> g_wd_name{nullptr};
std::atomic<const char*> g_wd_site{nullptr};
std::atomic<uint64_t> g_wd_block{0};   // x | y << 32 (z is rarely used: in the message as 0)
std::atomic<uint64_t> g_wd_thread{0};  // x | y << 21 | z << 42
std::once_flag g_watchdog_once;

// Where fatal messages go (the watchdog, a faulting kernel, misuse): stderr, or the descriptor the tests give
// (pytest captures fd 2 into a file that a dying process never shows; tscd_cudasim::set_message_fd).
std::atomic<int> g_message_fd{2};

void fatal_message(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void fatal_message(const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  const int n = std::vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (n > 0) (void)!write(g_message_fd.load(), msg, static_cast<size_t>(std::min<int>(n, sizeof(msg) - 1)));
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double env_seconds(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const double s = std::strtod(v, &end);
  return (end != v && s > 0) ? s : fallback;
}

void watchdog_loop() {
  const double limit = env_seconds("TSCD_CUDASIM_TIMEOUT", 120.0);
  while (true) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    if (!g_active.load()) continue;
    const double ran = (now_ns() - g_block_start_ns.load()) * 1e-9;
    if (ran < limit) continue;
    const uint64_t b = g_wd_block.load(), t = g_wd_thread.load();
    fatal_message("\ncudasim watchdog: kernel %s (launched at %s) is hung: block (%u, %u) has run for %.1f s "
                  "(limit TSCD_CUDASIM_TIMEOUT=%.1f s); the last thread resumed was (%u, %u, %u). A spin loop that "
                  "never sees its condition change (a lost atomic update, a flag never set) or a thread that "
                  "never returns. Ending the process.\n",
                  g_wd_name.load(), g_wd_site.load(), (unsigned)(b & 0xffffffffu), (unsigned)(b >> 32), ran, limit,
                  (unsigned)(t & 0x1fffff), (unsigned)((t >> 21) & 0x1fffff), (unsigned)(t >> 42));
    std::_Exit(124);
  }
}

// A kernel that faults (an out-of-bounds access) takes the process down as it would take the GPU context: first
// this names the kernel, its launch site, the block and the thread, then the previous handler (Python's
// faulthandler under pytest) runs.
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void*) {
  const LaunchState* L = tl_launch;
  if (L != nullptr) {
    const uint64_t b = g_wd_block.load(), t = g_wd_thread.load();
    fatal_message("\ncudasim: kernel %s (launched at %s) crashed with %s at address %p in block (%u, %u), thread "
                  "(%u, %u, %u): an access outside its buffers (an index or bound off?)\n",
                  L->name, L->site, sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr,
                  (unsigned)(b & 0xffffffffu), (unsigned)(b >> 32), (unsigned)(t & 0x1fffff),
                  (unsigned)((t >> 21) & 0x1fffff), (unsigned)(t >> 42));
  }
  sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);  // the fault repeats into it
}

void install_fault_handler() {
  static thread_local bool have_stack = false;
  if (!have_stack) {  // the handler must run when a fiber overflowed into its guard page
    static thread_local std::vector<char> alt(64 * 1024);
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, nullptr);
    have_stack = true;
  }
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = &on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
}

void set_error(cudaError_t err, std::string detail) {
  tl_error = err;
  tl_detail = std::move(detail);
}

std::string dim_str(dim3 d) {
  std::ostringstream s;
  s << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return s.str();
}

std::string idx_str(uint3 d) { return dim_str(dim3(d.x, d.y, d.z)); }

// Fills shared memory with NaN: every 4-byte word is the float NaN 0x7ff80000 and every 8-byte word the double NaN
// 0x7ff800007ff80000 (an int read from it is 2146959360, not 0 or -1).
void fill_nan(void* p, size_t bytes) {
  const uint32_t word = 0x7ff80000u;
  unsigned char* c = static_cast<unsigned char*>(p);
  size_t i = 0;
  for (; i + 4 <= bytes; i += 4) std::memcpy(c + i, &word, 4);
  for (; i < bytes; ++i) c[i] = reinterpret_cast<const unsigned char*>(&word)[i % 4];
}

[[noreturn]] void fatal(const char* what) {
  fatal_message("cudasim: %s\n", what);
  std::abort();
}

// ------------------------------------------------------------------------------------------------ fibers
size_t stack_bytes() {
  static const size_t bytes = [] {
    const char* v = std::getenv("TSCD_CUDASIM_STACK_KB");
    const long kb = v ? std::strtol(v, nullptr, 10) : 0;
    return kb > 0 ? static_cast<size_t>(kb) * 1024 : kDefaultStack;
  }();
  return bytes;
}

Fiber& fiber_slot(size_t i) {
  if (tl_fibers.size() <= i) tl_fibers.resize(i + 1);
  if (!tl_fibers[i]) tl_fibers[i] = std::make_unique<Fiber>();
  Fiber& f = *tl_fibers[i];
  if (f.stack == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    f.size = stack_bytes();
    void* m = mmap(nullptr, f.size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fatal("cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);  // a thread that overflows its stack faults instead of corrupting memory
    f.stack = static_cast<char*>(m) + page;
#ifdef CUDASIM_TSAN
    f.tsan = __tsan_create_fiber(0);
#endif
  }
  return f;
}

// A fresh stack frame on fiber f that starts cudasim_fiber_entry when switched to.
void prepare(Fiber& f) {
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.size) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  *--s = 0;                                                  // the entry's (never used) return address
  *--s = reinterpret_cast<uint64_t>(&cudasim_fiber_entry);  // popped by `ret`
  for (int r = 0; r < 6; ++r) *--s = 0;                     // rbp rbx r12 r13 r14 r15
  uint32_t csr[2] = {0x1f80, 0x037f};                       // MXCSR and x87 control word: the defaults
  __asm__ volatile("stmxcsr %0" : "=m"(csr[0]));
  __asm__ volatile("fnstcw %0" : "=m"(csr[1]));
  --s;
  std::memcpy(s, csr, sizeof(csr));
  f.sp = s;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = f.size;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&cudasim_fiber_entry), 0);
#endif
}

void to_fiber(Fiber& f) {
#ifdef CUDASIM_TSAN
  __tsan_switch_to_fiber(f.tsan, kTsanNoSync);
#endif
#if defined(__x86_64__)
  cudasim_switch(&tl_sched_sp, f.sp);
#else
  swapcontext(&tl_sched_ctx, &f.ctx);
#endif
}

void to_scheduler(Fiber& f) {
#ifdef CUDASIM_TSAN
  __tsan_switch_to_fiber(tl_sched_tsan, kTsanNoSync);
#endif
#if defined(__x86_64__)
  cudasim_switch(&f.sp, tl_sched_sp);
#else
  swapcontext(&f.ctx, &tl_sched_ctx);
#endif
}

LaunchState& launch_or_die(const char* what) {
  if (tl_launch == nullptr || tl_launch->cur == nullptr) {
    fatal_message("cudasim: %s used outside a kernel\n", what);
    std::abort();
  }
  return *tl_launch;
}

// ------------------------------------------------------------------------------------------------ ordering
enum class Order { kForward, kReverse, kShuffle };

std::pair<Order, uint64_t> current_order() {
  std::string spec;
  int64_t seed = 0;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    spec = g_order_override;
    seed = g_order_seed;
  }
  if (spec.empty()) {
    const char* v = std::getenv("TSCD_CUDASIM_ORDER");
    spec = v ? v : "forward";
    const size_t colon = spec.find(':');
    if (colon != std::string::npos) {
      seed = std::strtoll(spec.c_str() + colon + 1, nullptr, 10);
      spec = spec.substr(0, colon);
    }
  }
  if (spec.empty() || spec == "forward") return {Order::kForward, 0};
  if (spec == "reverse") return {Order::kReverse, 0};
  if (spec == "shuffle") return {Order::kShuffle, static_cast<uint64_t>(seed)};
  TORCH_CHECK(false, "cudasim: TSCD_CUDASIM_ORDER must be forward, reverse or shuffle[:seed]; got '", spec, "'");
}

// ------------------------------------------------------------------------------------------------ one block
std::string barrier_name(const ThreadState& t) { return std::string(t.bar_file) + ":" + std::to_string(t.bar_line); }

bool same_barrier(const ThreadState& a, const ThreadState& b) {
  return a.bar_line == b.bar_line && (a.bar_file == b.bar_file || std::strcmp(a.bar_file, b.bar_file) == 0);
}

// The failure message of a block whose threads diverged: where they wait, and how many have exited.
std::string divergence(const BlockState& B, const std::vector<ThreadState>& threads) {
  std::map<std::string, std::vector<size_t>> at;
  size_t done = 0, first_done = threads.size();
  for (size_t t = 0; t < threads.size(); ++t) {
    if (threads[t].status == Status::kBarrier) at[barrier_name(threads[t])].push_back(t);
    if (threads[t].status == Status::kDone && done++ == 0) first_done = t;
  }
  std::ostringstream s;
  s << "barrier divergence in block " << idx_str(B.idx) << ": ";
  bool first = true;
  for (const auto& [where, ts] : at) {
    s << (first ? "" : "; ") << ts.size() << " thread(s) wait at __syncthreads() " << where << " (first "
      << idx_str(threads[ts.front()].idx) << ")";
    first = false;
  }
  if (done > 0) s << "; " << done << " thread(s) have exited (first " << idx_str(threads[first_done].idx) << ")";
  s << ": every thread of a block must reach the same __syncthreads()";
  return s.str();
}

// Runs one block to its end; false (with L.failure set) on divergence or an exception in a thread.
bool run_block(LaunchState& L, BlockState& B, std::vector<ThreadState>& threads, std::vector<size_t>& runnable,
               size_t fiber_base, Order order, std::mt19937_64& rng) {
  const size_t T = threads.size();
  runnable.resize(T);
  std::iota(runnable.begin(), runnable.end(), size_t(0));
  for (size_t t = 0; t < T; ++t) {
    threads[t].status = Status::kReady;
    threads[t].started = false;
    threads[t].fiber = &fiber_slot(fiber_base + t);
  }
  while (true) {
    if (order == Order::kReverse) std::reverse(runnable.begin(), runnable.end());
    if (order == Order::kShuffle) std::shuffle(runnable.begin(), runnable.end(), rng);
    for (size_t t : runnable) {
      ThreadState& th = threads[t];
      L.cur = &th;
      g_wd_thread.store(uint64_t(th.idx.x) | uint64_t(th.idx.y) << 21 | uint64_t(th.idx.z) << 42,
                        std::memory_order_relaxed);
      if (!th.started) {
        th.started = true;
        prepare(*th.fiber);
      }
      to_fiber(*th.fiber);
      L.cur = nullptr;
      if (!L.failure.empty()) return false;
    }
    // every thread has exited, or waits at a barrier: all at the same one, or it is divergence
    const ThreadState* first = nullptr;
    bool exited = false, diverged = false;
    runnable.clear();
    for (size_t t = 0; t < T; ++t) {
      const ThreadState& th = threads[t];
      if (th.status == Status::kDone) {
        exited = true;
        continue;
      }
      if (first == nullptr) first = &th;
      diverged = diverged || !same_barrier(th, *first);
      runnable.push_back(t);
    }
    if (first == nullptr) return true;
    if (exited || diverged) {
      L.failure = divergence(B, threads);
      return false;
    }
    for (size_t t : runnable) threads[t].status = Status::kReady;
    ++B.generation;
  }
}

std::string check_config(dim3 grid, dim3 block, size_t smem, size_t limit) {
  std::ostringstream s;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    s << "grid " << dim_str(grid) << " has an empty dimension";
  } else if (block.x == 0 || block.y == 0 || block.z == 0) {
    s << "block " << dim_str(block) << " has an empty dimension";
  } else if (threads > kMaxThreadsPerBlock) {
    s << "block " << dim_str(block) << " has " << threads << " threads, more than " << kMaxThreadsPerBlock;
  } else if (block.x > kMaxBlockDimXY || block.y > kMaxBlockDimXY || block.z > kMaxBlockDimZ) {
    s << "block " << dim_str(block) << " exceeds the block dimension limits (1024, 1024, 64)";
  } else if (grid.x > kMaxGridDimX) {
    s << "grid " << dim_str(grid) << ": grid.x exceeds " << kMaxGridDimX;
  } else if (grid.y > kMaxGridDimYZ || grid.z > kMaxGridDimYZ) {
    s << "grid " << dim_str(grid) << ": grid.y and grid.z may be at most " << kMaxGridDimYZ;
  }
  if (!s.str().empty()) return s.str();
  if (smem > limit) {
    s << "SMEM " << smem << " bytes of dynamic shared memory exceed the kernel's limit of " << limit << " bytes";
    if (limit < g_optin.load()) {
      s << " (above " << kDefaultSharedMemory << " bytes a kernel must opt in with cudaFuncSetAttribute(kernel, "
        << "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes); this GPU allows at most " << g_optin.load() << ")";
    }
  }
  return s.str();
}

void log_launch(const LaunchState& L, const std::string& error) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_log.size() < kMaxLog) g_log.push_back(LogEntry{L.name, L.site, error, L.grid, L.block, L.smem});
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o;
}

}  // namespace

// ------------------------------------------------------------------------------------------------ fiber entry
extern "C" void cudasim_fiber_entry() {
  LaunchState& L = *tl_launch;
  ThreadState& th = *L.cur;
#ifdef CUDASIM_TSAN
  __tsan_acquire(L.start_sync);
  __tsan_acquire(&L.blk->start_sync);
#endif
  try {
    L.body(L.ctx);
  } catch (const std::exception& e) {
    L.failure = std::string("thread ") + idx_str(th.idx) + " of block " + idx_str(L.blk->idx) + " threw: " + e.what();
  } catch (...) {
    L.failure = std::string("thread ") + idx_str(th.idx) + " of block " + idx_str(L.blk->idx) + " threw";
  }
  CUDASIM_TSAN_ONLY(__tsan_release(L.end_sync));
  th.status = Status::kDone;
  to_scheduler(*th.fiber);
  fatal("a finished GPU thread was resumed");
}

void free_block(BlockState* B) {
  std::free(B->dyn_shared);
  std::free(B->static_arena);
  delete B;
}

// ------------------------------------------------------------------------------------------------ API
uint3 thread_idx() { return launch_or_die("threadIdx").cur->idx; }
uint3 block_idx() { return launch_or_die("blockIdx").blk->idx; }
dim3 block_dim() { return launch_or_die("blockDim").block; }
dim3 grid_dim() { return launch_or_die("gridDim").grid; }

void syncthreads(const char* file, int line) {
  LaunchState& L = launch_or_die("__syncthreads()");
  ThreadState& th = *L.cur;
  th.status = Status::kBarrier;
  th.bar_file = file;
  th.bar_line = line;
  th.bar_generation = L.blk->generation;
  CUDASIM_TSAN_ONLY(__tsan_release(&L.blk->barrier_sync[th.bar_generation % 2]));
  to_scheduler(*th.fiber);
  CUDASIM_TSAN_ONLY(__tsan_acquire(&tl_launch->blk->barrier_sync[th.bar_generation % 2]));
}

void threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
#ifdef CUDASIM_TSAN
  __tsan_release(&g_fence_sync);
  __tsan_acquire(&g_fence_sync);
#endif
}

void* dynamic_shared_memory() { return launch_or_die("extern __shared__ memory").blk->dyn_shared; }

void* static_shared_memory(const char* key, size_t bytes, size_t align) {
  LaunchState& L = launch_or_die("__shared__ memory");
  BlockState& B = *L.blk;
  for (int i = 0; i < B.num_statics; ++i) {
    if (B.static_keys[i] == key || std::strcmp(B.static_keys[i], key) == 0) return B.static_ptrs[i];
  }
  if (B.num_statics == kMaxStatics) fatal("more than 64 static __shared__ variables in one kernel");
  const size_t start = (B.static_bytes + align - 1) / align * align;
  if (start + bytes + L.smem > std::max(L.shared_limit, kDefaultSharedMemory)) {
    L.failure = "static shared memory (" + std::to_string(start + bytes) + " bytes) + dynamic (" +
                std::to_string(L.smem) + ") exceed the block's " +
                std::to_string(std::max(L.shared_limit, kDefaultSharedMemory)) + " bytes";
    fatal_message("cudasim: %s\n", L.failure.c_str());  // the thread goes on: it must not write outside
    std::abort();
  }
  B.static_bytes = start + bytes;
  void* p = B.static_arena + start;
  fill_nan(p, bytes);
  B.static_keys[B.num_statics] = key;
  B.static_ptrs[B.num_statics++] = p;
  return p;
}

void run_launch(const char* name, const char* site, const void* func, dim3 grid, dim3 block, size_t smem,
                cudaStream_t, ThreadBody body, const void* ctx) {
  if (tl_launch != nullptr) fatal("a kernel launched another kernel (dynamic parallelism is not simulated)");
  std::call_once(g_watchdog_once, [] { std::thread(watchdog_loop).detach(); });
  install_fault_handler();
  LaunchState L{};
  L.name = name;
  L.site = site;
  L.grid = grid;
  L.block = block;
  L.smem = smem;
  L.body = body;
  L.ctx = ctx;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_max_dynamic_shared.find(func);
    L.shared_limit = it == g_max_dynamic_shared.end() ? kDefaultSharedMemory : static_cast<size_t>(it->second);
  }
  const std::string bad = check_config(grid, block, smem, L.shared_limit);
  if (!bad.empty()) {
    const bool smem_error = bad.rfind("SMEM ", 0) == 0;
    const std::string what = smem_error ? bad.substr(5) : bad;
    set_error(smem_error ? cudaErrorInvalidValue : cudaErrorInvalidConfiguration,
              std::string("launch of ") + name + " at " + site + " refused: " + what);
    log_launch(L, what);
    return;
  }
  const auto [order, seed] = current_order();
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  const size_t T = size_t(block.x) * block.y * block.z;
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull + nblocks * 31 + T);
  // block execution order: a permutation of the linear block indices (x fastest)
  std::vector<uint64_t> perm;
  uint64_t stride = 1, offset = 0;
  if (order == Order::kShuffle) {
    if (nblocks <= (uint64_t(1) << 24)) {
      perm.resize(nblocks);
      std::iota(perm.begin(), perm.end(), uint64_t(0));
      std::shuffle(perm.begin(), perm.end(), rng);
    } else {  // a bijection i -> (stride * i + offset) mod n, stride coprime to n
      stride = (rng() % nblocks) | 1;
      while (std::gcd(stride, nblocks) != 1) stride += 2;
      offset = rng() % nblocks;
    }
  }
  std::vector<ThreadState> threads(T);
  std::vector<size_t> runnable;
  std::vector<BlockState*> finished;
  for (size_t t = 0; t < T; ++t) {
    threads[t].idx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                           static_cast<unsigned>(t / (size_t(block.x) * block.y))};
  }
#ifdef CUDASIM_TSAN
  L.start_sync = static_cast<char*>(std::malloc(1));
  L.end_sync = static_cast<char*>(std::malloc(1));
  tl_sched_tsan = __tsan_get_current_fiber();
  __tsan_release(L.start_sync);
#endif
  tl_launch = &L;
  g_wd_name.store(name);
  g_wd_site.store(site);
  bool ok = true;
  for (uint64_t s = 0; s < nblocks && ok; ++s) {
    uint64_t lin = s;
    if (order == Order::kReverse) lin = nblocks - 1 - s;
    if (order == Order::kShuffle) lin = perm.empty() ? (stride * s + offset) % nblocks : perm[s];
    BlockState* B = new BlockState();
    B->idx = uint3{static_cast<unsigned>(lin % grid.x), static_cast<unsigned>(lin / grid.x % grid.y),
                   static_cast<unsigned>(lin / (uint64_t(grid.x) * grid.y))};
    B->dyn_shared = std::aligned_alloc(128, std::max<size_t>(128, (smem + 127) / 128 * 128));
    fill_nan(B->dyn_shared, smem);
    B->static_arena = static_cast<char*>(std::aligned_alloc(128, kDefaultSharedMemory));
    B->static_bytes = 0;
    B->num_statics = 0;
    B->generation = 0;
    CUDASIM_TSAN_ONLY(__tsan_release(&B->start_sync));
    L.blk = B;
    g_wd_block.store(uint64_t(B->idx.x) | uint64_t(B->idx.y) << 32, std::memory_order_relaxed);
    g_block_start_ns.store(now_ns());
    g_active.store(true);
    ok = run_block(L, *B, threads, runnable, (s % kTsanGroups) * T, order, rng);
    g_active.store(false);
    if (!ok) L.failure = L.failure + " [kernel " + name + " launched at " + site + ", grid " + dim_str(grid) +
                         ", block " + dim_str(block) + "]";
#ifdef CUDASIM_TSAN
    finished.push_back(B);  // freed after the kernel's end: a free is a write, ordered after the threads only then
#else
    free_block(B);
#endif
    L.blk = nullptr;
  }
  tl_launch = nullptr;
#ifdef CUDASIM_TSAN
  __tsan_acquire(L.end_sync);
  std::free(L.start_sync);
  std::free(L.end_sync);
  if (!ok) {  // threads the failure abandoned never reached the kernel's end: order their accesses before the
    // host's next steps (frees included) with a synchronising fiber switch, which TSan counts as one
    for (const auto& f : tl_fibers) {
      if (f && f->tsan != nullptr) {
        __tsan_switch_to_fiber(f->tsan, 0);
        __tsan_switch_to_fiber(tl_sched_tsan, 0);
      }
    }
  }
  for (BlockState* B : finished) free_block(B);
#endif
  if (!ok) {
    set_error(cudaErrorLaunchFailure, L.failure);
    log_launch(L, L.failure);
  } else {
    log_launch(L, "");
  }
}

cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > g_optin.load()) {
      set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(value) +
                                           "): this GPU allows at most " + std::to_string(g_optin.load()) +
                                           " bytes per block");
      return cudaErrorInvalidValue;
    }
    std::lock_guard<std::mutex> lock(g_mutex);
    g_max_dynamic_shared[func] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute " + std::to_string(int(attr)) +
                                       " is not simulated");
  return cudaErrorInvalidValue;
}

const char* error_detail() { return tl_detail.c_str(); }

int64_t knob(const char* name, int64_t default_value) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_knobs.find(name);
  return it == g_knobs.end() ? default_value : it->second;
}

// ------------------------------------------------------------------------------------------------ control ops
namespace {

void set_order_op(const std::string& order, int64_t seed) {
  TORCH_CHECK(order.empty() || order == "forward" || order == "reverse" || order == "shuffle",
              "cudasim: order must be forward, reverse, shuffle or '' (TSCD_CUDASIM_ORDER); got '", order, "'");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_order_override = order;
  g_order_seed = seed;
}

int64_t set_optin_op(int64_t bytes) {
  TORCH_CHECK(bytes >= int64_t(kDefaultSharedMemory), "cudasim: the opt-in limit must be >= 49152; got ", bytes);
  return static_cast<int64_t>(g_optin.exchange(static_cast<size_t>(bytes)));
}

void set_knob_op(const std::string& name, int64_t value) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_knobs[name] = value;
}

void clear_knobs_op() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_knobs.clear();
}

std::string launch_log_op() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < g_log.size(); ++i) {
    const LogEntry& e = g_log[i];
    s << (i ? "," : "") << "{\"name\":\"" << json_escape(e.name) << "\",\"site\":\"" << json_escape(e.site)
      << "\",\"grid\":[" << e.grid.x << "," << e.grid.y << "," << e.grid.z << "],\"block\":[" << e.block.x << ","
      << e.block.y << "," << e.block.z << "],\"smem\":" << e.smem << ",\"error\":\"" << json_escape(e.error)
      << "\"}";
  }
  s << "]";
  return s.str();
}

void clear_launch_log_op() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_log.clear();
}

void set_message_fd_op(int64_t fd) { g_message_fd.store(static_cast<int>(fd)); }

bool tsan_op() {
#ifdef CUDASIM_TSAN
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace cudasim

// ------------------------------------------------------------------------------------------------ runtime calls
cudaError_t cudaGetLastError() {
  const cudaError_t e = cudasim::tl_error;
  cudasim::tl_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cudasim::tl_error; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchTimeout: return "the launch timed out and was terminated";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchTimeout: return "cudaErrorLaunchTimeout";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) {
    cudasim::set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: no device " + std::to_string(device));
    return cudaErrorInvalidValue;
  }
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxBlockDimX: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; return cudaSuccess;
    case cudaDevAttrMaxGridDimY: *value = 65535; return cudaSuccess;
    case cudaDevAttrMaxGridDimZ: *value = 65535; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 49152; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(cudasim::g_optin.load()); return cudaSuccess;
  }
  cudasim::set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute " + std::to_string(int(attr)) +
                                                " is not simulated");
  return cudaErrorInvalidValue;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

TORCH_LIBRARY_FRAGMENT(tscd_cudasim, m) {
  m.def("set_order(str order, int seed=0) -> ()", &cudasim::set_order_op);
  m.def("set_shared_memory_optin(int bytes) -> int", &cudasim::set_optin_op);
  m.def("set_knob(str name, int value) -> ()", &cudasim::set_knob_op);
  m.def("clear_knobs() -> ()", &cudasim::clear_knobs_op);
  m.def("launch_log() -> str", &cudasim::launch_log_op);
  m.def("clear_launch_log() -> ()", &cudasim::clear_launch_log_op);
  m.def("tsan() -> bool", &cudasim::tsan_op);
  m.def("set_message_fd(int fd) -> ()", &cudasim::set_message_fd_op);
}
