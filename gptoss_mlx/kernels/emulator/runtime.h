// runtime.h: GPU execution model for the emulator (included by msl.h).
//
// Threads of a threadgroup are cooperative fibers (ucontext) run by one OS thread; threadgroups
// are taken from a shared counter by up to `nworkers` OS threads. A fiber runs until it finishes
// or blocks at a barrier or a SIMD/quad collective. When no fiber of the threadgroup can run:
//   1. every SIMD collective some lanes wait at completes over the lanes of that simdgroup waiting
//      at the same call site (same function, type, file and line);
//   2. if a thread yielded while polling an atomic (every 256 atomic loads or compare-exchanges),
//      run again; 20000 passes in which no thread finishes or blocks are reported as a deadlock;
//   3. otherwise every live thread waits at a barrier: if all at the same call site it releases,
//      else that is barrier divergence (a deadlock on a GPU) and the launch fails.
// Threadgroup storage declared in the kernel is registered on first use in each threadgroup and
// poisoned with 0xFF bytes (NaN for float, half and bfloat) unless poisoning is off.
#pragma once

#include <ucontext.h>
#include <pthread.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdarg.h>

namespace msl {
using metal::uint3;

enum { LANE_FORWARD = 0, LANE_REVERSE = 1, LANE_RANDOM = 2 };
enum { F_READY = 0, F_BARRIER = 1, F_COLL = 2, F_DONE = 3 };

struct Launch {  // filled in by Python (ctypes), mirrored there field by field
  void** bufs;
  int64_t* lo;           // guarded mode: first valid element index of each buffer
  int64_t* hi;           // guarded mode: one past the last valid element index
  const char** names;    // buffer names, for messages
  uint32_t grid[3];
  uint32_t tg[3];
  int32_t lane_order;
  int32_t poison;
  int32_t strict_barriers;
  int32_t nworkers;
  uint64_t seed;
  int64_t max_tg_bytes;
  const char* kernel_name;
  char* err;
  int32_t errlen;
};

struct Attrs {
  uint dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint quadgroup_index_in_threadgroup, quadgroups_per_threadgroup, simdgroup_index_in_threadgroup,
      simdgroups_per_threadgroup, thread_execution_width, thread_index_in_quadgroup,
      thread_index_in_simdgroup, thread_index_in_threadgroup;
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid,
      threadgroups_per_grid, threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

struct Fiber;
typedef void (*CollFn)(Fiber** parts, int n);

struct Fiber {
  ucontext_t ctx;  // portable switching (ucontext)
  void* sp;        // fast switching: the saved stack pointer
  int state;
  uint32_t tid;  // linear index in the threadgroup
  uint3 pos;     // position in the threadgroup
  // pending collective
  CollFn cfn;
  const void* cin;
  void* cout;
  int64_t carg;
  unsigned cline;
  const char* cfile;
  // pending barrier
  unsigned bline;
  const char* bfile;
  // spin detection: atomic loads since the fiber last made progress
  uint32_t spins;
};

struct Worker {
  char* stacks = nullptr;
  size_t stack_size = 0;
  int cap = 0;
  Fiber* fibers = nullptr;
  int* order = nullptr;
  ucontext_t main_ctx;
  void* main_sp;
  int n = 0;
  uint3 tg_size, tg_pos;
  uint64_t rng = 0;
  uint64_t epoch = 0;
  struct Reg { void* addr; size_t size; uint64_t epoch; };
  Reg regs[64];
  int nregs = 0;
  int64_t tg_bytes = 0;
  bool yielded = false;
  bool progress = false;
};

// the launch in progress (one at a time per process: Python serialises calls)
static Launch* g_launch;
static volatile int g_failed;
static pthread_mutex_t g_err_mu = PTHREAD_MUTEX_INITIALIZER;
static uint32_t g_next_tg;
static uint32_t g_num_tg;
static thread_local Worker* tl_worker;
static thread_local Fiber* tl_fiber;

static void kernel_entry(void** bufs, const Attrs& a);  // generated after the kernel

// Record the first error (later ones are dropped) and make every worker stop.
static void fail(const char* fmt, ...) {
  pthread_mutex_lock(&g_err_mu);
  if (!g_failed) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_launch->err, g_launch->errlen, fmt, ap);
    va_end(ap);
    __atomic_store_n(&g_failed, 1, __ATOMIC_SEQ_CST);
  }
  pthread_mutex_unlock(&g_err_mu);
}

static const char* where_thread(char* buf, size_t n) {
  Worker* w = tl_worker;
  Fiber* f = tl_fiber;
  if (!w || !f) { snprintf(buf, n, "?"); return buf; }
  snprintf(buf, n, "thread_position_in_grid (%u, %u, %u)",
           w->tg_pos.x * g_launch->tg[0] + f->pos.x, w->tg_pos.y * g_launch->tg[1] + f->pos.y,
           w->tg_pos.z * g_launch->tg[2] + f->pos.z);
  return buf;
}

// ---- switching between the scheduler and the fibers. On x86-64 a hand-written switch saves the
// callee-saved registers on the stack and swaps stack pointers (no signal-mask system calls, which
// swapcontext makes twice per switch and which dominate kernels rich in SIMD collectives);
// elsewhere ucontext does it.
#if defined(__x86_64__) && defined(__ELF__)
#define MSL_FAST_SWITCH 1
extern "C" void msl_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl msl_switch_stack
  .hidden msl_switch_stack
  .type msl_switch_stack, @function
msl_switch_stack:
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
  .size msl_switch_stack, .-msl_switch_stack
)");
#endif

static void fiber_main();
static inline void to_scheduler(Fiber* f) {
#ifdef MSL_FAST_SWITCH
  msl_switch_stack(&f->sp, tl_worker->main_sp);
#else
  swapcontext(&f->ctx, &tl_worker->main_ctx);
#endif
}
static inline void to_fiber(Worker* w, Fiber* f) {
#ifdef MSL_FAST_SWITCH
  msl_switch_stack(&w->main_sp, f->sp);
#else
  swapcontext(&w->main_ctx, &f->ctx);
#endif
}
#ifdef MSL_FAST_SWITCH
static void fiber_start() {  // entered by the first switch to a fiber
  fiber_main();
  msl_switch_stack(&tl_fiber->sp, tl_worker->main_sp);  // done: never resumed
  __builtin_unreachable();
}
#endif
// Prepare fiber f of worker w to start at fiber_main on its own stack.
static inline void init_fiber(Worker* w, Fiber* f, char* stack, size_t size) {
#ifdef MSL_FAST_SWITCH
  uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
  void** sp = (void**)top;
  *--sp = nullptr;                 // fiber_start's (unused) return address
  *--sp = (void*)&fiber_start;     // where msl_switch_stack's ret goes: rsp = 8 mod 16 after it
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12..r15
  f->sp = sp;
  (void)w;
#else
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = stack;
  f->ctx.uc_stack.ss_size = size;
  f->ctx.uc_link = &w->main_ctx;
  makecontext(&f->ctx, fiber_main, 0);
#endif
}

static inline void block(int state) {
  Fiber* f = tl_fiber;
  f->state = state;
  f->spins = 0;
  tl_worker->progress = true;
  to_scheduler(f);
}

// Called by atomic loads and compare-exchanges: a thread that keeps polling an atomic lets the
// other threads of its threadgroup run (a spin-wait on another thread would never end otherwise).
static const uint32_t SPIN_YIELD = 256;
static inline void spin_point() {
  Fiber* f = tl_fiber;
  if (!f) return;
  if (++f->spins % SPIN_YIELD == 0) {
    tl_worker->yielded = true;
    to_scheduler(f);
  }
}

// ---- threadgroup storage registration (poison + 32 KB limit) --------------------------------
inline void tg_register(void* addr, size_t size) {
  Worker* w = tl_worker;
  for (int i = 0; i < w->nregs; ++i) {
    if (w->regs[i].addr == addr) {
      if (w->regs[i].epoch != w->epoch) {
        w->regs[i].epoch = w->epoch;
        if (g_launch->poison) __builtin_memset(addr, 0xff, size);
      }
      return;
    }
  }
  if (w->nregs < 64) w->regs[w->nregs++] = {addr, size, w->epoch};
  w->tg_bytes += (int64_t)size;
  if (w->tg_bytes > g_launch->max_tg_bytes) {
    fail("kernel '%s' declares %lld bytes of threadgroup memory; Metal allows %lld",
         g_launch->kernel_name, (long long)w->tg_bytes, (long long)g_launch->max_tg_bytes);
  }
  if (g_launch->poison) __builtin_memset(addr, 0xff, size);
}

// ---- fibers and the threadgroup scheduler -----------------------------------------------------
static void fiber_main() {
  Worker* w = tl_worker;
  Fiber* f = tl_fiber;
  Launch* L = g_launch;
  Attrs a;
  uint3 tgs = w->tg_size;
  uint nthreads = tgs.x * tgs.y * tgs.z;
  uint3 dtg(L->tg[0], L->tg[1], L->tg[2]);
  uint dn = dtg.x * dtg.y * dtg.z;
  a.dispatch_quadgroups_per_threadgroup = (dn + 3) / 4;
  a.dispatch_simdgroups_per_threadgroup = (dn + 31) / 32;
  a.dispatch_threads_per_threadgroup = dtg;
  a.grid_origin = uint3(0u, 0u, 0u);
  a.grid_size = uint3(L->grid[0], L->grid[1], L->grid[2]);
  a.quadgroup_index_in_threadgroup = f->tid / 4;
  a.quadgroups_per_threadgroup = (nthreads + 3) / 4;
  a.simdgroup_index_in_threadgroup = f->tid / 32;
  a.simdgroups_per_threadgroup = (nthreads + 31) / 32;
  a.thread_execution_width = 32;
  a.thread_index_in_quadgroup = f->tid % 4;
  a.thread_index_in_simdgroup = f->tid % 32;
  a.thread_index_in_threadgroup = f->tid;
  a.thread_position_in_grid = uint3(w->tg_pos.x * dtg.x + f->pos.x, w->tg_pos.y * dtg.y + f->pos.y,
                                    w->tg_pos.z * dtg.z + f->pos.z);
  a.thread_position_in_threadgroup = f->pos;
  a.threadgroup_position_in_grid = w->tg_pos;
  a.threadgroups_per_grid = uint3((L->grid[0] + dtg.x - 1) / dtg.x, (L->grid[1] + dtg.y - 1) / dtg.y,
                                  (L->grid[2] + dtg.z - 1) / dtg.z);
  a.threads_per_grid = a.grid_size;
  a.threads_per_simdgroup = 32;
  a.threads_per_threadgroup = tgs;
  kernel_entry(L->bufs, a);
  f->state = F_DONE;
  w->progress = true;
  // returns to the scheduler (uc_link, or fiber_start's last switch)
}

static inline uint64_t rng_next(uint64_t& s) {
  s ^= s << 13; s ^= s >> 7; s ^= s << 17;
  return s;
}

static void run_threadgroup(Worker* w) {
  Launch* L = g_launch;
  int n = w->n;
  w->epoch++;
  w->yielded = false;
  w->progress = false;
  for (int i = 0; i < n; ++i) {
    Fiber* f = &w->fibers[i];
    f->state = F_READY;
    f->tid = i;
    f->spins = 0;
    f->pos = uint3(i % w->tg_size.x, (i / w->tg_size.x) % w->tg_size.y, i / (w->tg_size.x * w->tg_size.y));
    init_fiber(w, f, w->stacks + (size_t)i * w->stack_size, w->stack_size);
    w->order[i] = (L->lane_order == LANE_REVERSE) ? n - 1 - i : i;
  }
  Fiber* parts[32];
  uint64_t idle_passes = 0;
  for (;;) {
    if (L->lane_order == LANE_RANDOM) {
      for (int i = n - 1; i > 0; --i) {
        int j = (int)(rng_next(w->rng) % (uint64_t)(i + 1));
        int t = w->order[i]; w->order[i] = w->order[j]; w->order[j] = t;
      }
    }
    for (int k = 0; k < n; ++k) {
      Fiber* f = &w->fibers[w->order[k]];
      if (f->state != F_READY) continue;
      tl_fiber = f;
      to_fiber(w, f);
      tl_fiber = nullptr;
      if (g_failed) return;
    }
    // 1. SIMD collectives, one simdgroup and call site at a time
    bool any_coll = false;
    for (int sg = 0; sg * 32 < n; ++sg) {
      int lo = sg * 32, hi = lo + 32 < n ? lo + 32 : n;
      for (;;) {
        int np = 0;
        Fiber* first = nullptr;
        for (int i = lo; i < hi; ++i) {
          Fiber* f = &w->fibers[i];
          if (f->state != F_COLL) continue;
          if (!first) first = f;
          if (f->cfn == first->cfn && f->cline == first->cline && f->cfile == first->cfile) parts[np++] = f;
        }
        if (!np) break;
        first->cfn(parts, np);
        for (int i = 0; i < np; ++i) parts[i]->state = F_READY;
        any_coll = true;
      }
    }
    if (any_coll) { idle_passes = 0; continue; }
    if (w->yielded) {
      // Some thread polls an atomic: run everyone again. Passes in which no thread finishes or
      // blocks mean the value polled never changes: a deadlock (it would hang a GPU too).
      w->yielded = false;
      if (w->progress) idle_passes = 0;
      w->progress = false;
      if (++idle_passes > 20000) {
        fail("deadlock in kernel '%s', threadgroup (%u, %u, %u): threads keep polling atomics that no "
             "thread changes", L->kernel_name, w->tg_pos.x, w->tg_pos.y, w->tg_pos.z);
        return;
      }
      continue;
    }
    idle_passes = 0;
    // 2. barrier
    int live = 0, at = 0;
    Fiber* b0 = nullptr;
    Fiber* other = nullptr;
    int n0 = 0;
    for (int i = 0; i < n; ++i) {
      Fiber* f = &w->fibers[i];
      if (f->state == F_DONE) continue;
      live++;
      if (f->state == F_BARRIER) {
        at++;
        if (!b0) b0 = f;
        if (f->bline == b0->bline && f->bfile == b0->bfile) n0++;
        else if (!other) other = f;
      }
    }
    if (live == 0) return;
    if (other) {
      fail("barrier divergence in kernel '%s', threadgroup (%u, %u, %u): %d thread(s) wait at the "
           "barrier at %s:%u (thread %u first) and %d at %s:%u (thread %u first); on a GPU this "
           "deadlocks or corrupts threadgroup memory",
           L->kernel_name, w->tg_pos.x, w->tg_pos.y, w->tg_pos.z, n0, b0->bfile, b0->bline, b0->tid,
           at - n0, other->bfile, other->bline, other->tid);
      return;
    }
    if (at != live) {
      fail("deadlock in kernel '%s': threads neither run nor wait at a barrier", L->kernel_name);
      return;
    }
    if (L->strict_barriers && live != n) {
      fail("barrier divergence in kernel '%s', threadgroup (%u, %u, %u): %d thread(s) wait at the "
           "barrier at %s:%u but %d thread(s) of the threadgroup already returned without reaching it",
           L->kernel_name, w->tg_pos.x, w->tg_pos.y, w->tg_pos.z, live, b0->bfile, b0->bline, n - live);
      return;
    }
    for (int i = 0; i < n; ++i)
      if (w->fibers[i].state == F_BARRIER) w->fibers[i].state = F_READY;
  }
}

static void* worker_main(void* arg) {
  Worker* w = (Worker*)arg;
  Launch* L = g_launch;
  tl_worker = w;
  uint32_t ntx = (L->grid[0] + L->tg[0] - 1) / L->tg[0];
  uint32_t nty = (L->grid[1] + L->tg[1] - 1) / L->tg[1];
  for (;;) {
    if (g_failed) break;
    uint32_t idx = __atomic_fetch_add(&g_next_tg, 1, __ATOMIC_SEQ_CST);
    if (idx >= g_num_tg) break;
    uint3 p(idx % ntx, (idx / ntx) % nty, idx / (ntx * nty));
    w->tg_pos = p;
    uint sx = L->grid[0] - p.x * L->tg[0]; if (sx > L->tg[0]) sx = L->tg[0];
    uint sy = L->grid[1] - p.y * L->tg[1]; if (sy > L->tg[1]) sy = L->tg[1];
    uint sz = L->grid[2] - p.z * L->tg[2]; if (sz > L->tg[2]) sz = L->tg[2];
    w->tg_size = uint3(sx, sy, sz);
    w->n = (int)(sx * sy * sz);
    w->rng = (L->seed + 0x9E3779B97F4A7C15ull * (idx + 1)) | 1;
    run_threadgroup(w);
  }
  tl_worker = nullptr;
  return nullptr;
}

}  // namespace msl

extern "C" __attribute__((visibility("default"))) int msl_launch(msl::Launch* L) {
  using namespace msl;
  g_launch = L;
  g_failed = 0;
  g_next_tg = 0;
  uint64_t ntg = 1;
  for (int d = 0; d < 3; ++d) ntg *= (L->grid[d] + L->tg[d] - 1) / L->tg[d];
  g_num_tg = (uint32_t)ntg;
  int cap = (int)(L->tg[0] * L->tg[1] * L->tg[2]);
  int nw = L->nworkers < 1 ? 1 : L->nworkers;
  if ((uint64_t)nw > ntg) nw = (int)ntg;
  Worker* ws = new Worker[nw];
  const size_t stack = 256 * 1024;
  for (int i = 0; i < nw; ++i) {
    ws[i].cap = cap;
    ws[i].stack_size = stack;
    ws[i].stacks = (char*)mmap(nullptr, stack * cap, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ws[i].stacks == (char*)MAP_FAILED) {
      ws[i].stacks = nullptr;
      nw = i;
      if (nw == 0) {
        fail("kernel '%s': cannot map %zu bytes of fiber stacks", L->kernel_name, stack * cap);
        delete[] ws;
        return 1;
      }
      break;
    }
    ws[i].fibers = new Fiber[cap];
    ws[i].order = new int[cap];
  }
  pthread_t* th = new pthread_t[nw];
  for (int i = 1; i < nw; ++i) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 8 << 20);
    pthread_create(&th[i], &attr, worker_main, &ws[i]);
    pthread_attr_destroy(&attr);
  }
  worker_main(&ws[0]);
  for (int i = 1; i < nw; ++i) pthread_join(th[i], nullptr);
  for (int i = 0; i < nw; ++i) {
    munmap(ws[i].stacks, stack * cap);
    delete[] ws[i].fibers;
    delete[] ws[i].order;
  }
  delete[] th;
  delete[] ws;
  return g_failed ? 1 : 0;
}

namespace metal {

// ---- barriers ----------------------------------------------------------------------------------
inline void threadgroup_barrier(mem_flags = mem_flags::mem_none, unsigned line = __builtin_LINE(),
                                const char* file = __builtin_FILE()) {
  msl::Fiber* f = msl::tl_fiber;
  f->bline = line;
  f->bfile = file;
  msl::block(msl::F_BARRIER);
}

// ---- SIMD and quad collectives -----------------------------------------------------------------
enum CollOp { C_SUM, C_PROD, C_MAX, C_MIN, C_AND, C_OR, C_XOR, C_PINC_SUM, C_PEXC_SUM, C_PINC_PROD,
              C_PEXC_PROD, C_SHUF, C_SHUF_DOWN, C_SHUF_UP, C_SHUF_XOR, C_ROT_DOWN, C_ROT_UP, C_BCAST,
              C_BCAST_FIRST, C_ALL, C_ANY, C_BALLOT, C_IS_FIRST, C_NOP, C_FILL_DOWN, C_FILL_UP };

// The two inputs of simd_shuffle_and_fill_{down,up}: this lane's data and filling data.
template <class T> struct FillPair { T data, fill; };

template <class T> inline T msl_poison() { T t; __builtin_memset((void*)&t, 0xff, sizeof(T)); return t; }

// Computes every participant's result; runs on the scheduler's stack while all lanes are blocked.
template <class T, class R, int Op, int G>
void coll_impl(msl::Fiber** parts, int n) {
  const T* in[32] = {};
  bool act[32] = {};
  for (int i = 0; i < n; ++i) { int l = parts[i]->tid & 31; act[l] = true; in[l] = (const T*)parts[i]->cin; }
  for (int i = 0; i < n; ++i) {
    msl::Fiber* p = parts[i];
    int lane = p->tid & 31;
    int g0 = lane - lane % G;  // first lane of this lane's group (simdgroup or quad)
    int gl = lane - g0;        // index in the group
    R* out = (R*)p->cout;
    int64_t arg = p->carg;
    const T& x = *in[lane];
    auto src = [&](int64_t s) -> T {  // value of group lane s: own value outside the group, poison if inactive
      if (s < 0 || s >= G) return x;
      return act[g0 + s] ? *in[g0 + s] : msl_poison<T>();
    };
    if constexpr (Op == C_SUM || Op == C_PROD || Op == C_MAX || Op == C_MIN || Op == C_AND || Op == C_OR ||
                  Op == C_XOR || Op == C_PINC_SUM || Op == C_PEXC_SUM || Op == C_PINC_PROD || Op == C_PEXC_PROD) {
      bool prefix = Op == C_PINC_SUM || Op == C_PEXC_SUM || Op == C_PINC_PROD || Op == C_PEXC_PROD;
      int last = prefix ? gl : G - 1;
      bool have = false;
      T acc{};
      if constexpr (Op == C_PEXC_SUM) { acc = T(0); have = true; }
      if constexpr (Op == C_PEXC_PROD) { acc = T(1); have = true; }
      if constexpr (Op == C_PEXC_SUM || Op == C_PEXC_PROD) last = gl - 1;
      for (int s = 0; s <= last; ++s) {
        if (!act[g0 + s]) continue;
        const T& v = *in[g0 + s];
        if (!have) { acc = v; have = true; continue; }
        if constexpr (Op == C_SUM || Op == C_PINC_SUM || Op == C_PEXC_SUM) acc = T(acc + v);
        else if constexpr (Op == C_PROD || Op == C_PINC_PROD || Op == C_PEXC_PROD) acc = T(acc * v);
        else if constexpr (Op == C_MAX) acc = max(acc, v);
        else if constexpr (Op == C_MIN) acc = min(acc, v);
        else if constexpr (Op == C_AND) acc = T(acc & v);
        else if constexpr (Op == C_OR) acc = T(acc | v);
        else if constexpr (Op == C_XOR) acc = T(acc ^ v);
      }
      *out = acc;
    } else if constexpr (Op == C_SHUF || Op == C_BCAST) {
      *out = src(arg);
    } else if constexpr (Op == C_SHUF_DOWN) {
      *out = src(gl + arg);
    } else if constexpr (Op == C_SHUF_UP) {
      *out = src(gl - arg);
    } else if constexpr (Op == C_SHUF_XOR) {
      *out = src(gl ^ arg);
    } else if constexpr (Op == C_ROT_DOWN) {
      *out = src((gl + arg) % G);
    } else if constexpr (Op == C_ROT_UP) {
      *out = src(((gl - arg) % G + G) % G);
    } else if constexpr (Op == C_BCAST_FIRST) {
      int s = 0; while (!act[g0 + s]) ++s;
      *out = *in[g0 + s];
    } else if constexpr (Op == C_ALL || Op == C_ANY) {
      bool r = Op == C_ALL;
      for (int s = 0; s < G; ++s) if (act[g0 + s]) { bool b = bool(*in[g0 + s]); r = (Op == C_ALL) ? (r && b) : (r || b); }
      *out = r;
    } else if constexpr (Op == C_BALLOT) {
      uint64_t bits = 0, mask = 0;
      for (int s = 0; s < G; ++s) if (act[g0 + s]) { mask |= 1ull << s; if (bool(*in[g0 + s])) bits |= 1ull << s; }
      out->v = bits; out->mask = mask;
    } else if constexpr (Op == C_FILL_DOWN || Op == C_FILL_UP) {
      // vectors of `modulo` lanes (the whole group by default); lanes shifted past a vector's end
      // take the filling data of the vector's other end (MSL spec 6.9.2.1)
      int64_t delta = arg & 0xffff, M = arg >> 16;
      int base = gl - gl % (int)M, idx = gl % (int)M;
      int64_t s = Op == C_FILL_DOWN ? idx + delta : idx - delta;
      bool fill = s < 0 || s >= M;
      int64_t from = base + (s < 0 ? s + M : s >= M ? s - M : s);
      if (from < 0 || from >= G || !act[g0 + from]) *out = msl_poison<R>();
      else *out = fill ? in[g0 + from]->fill : in[g0 + from]->data;
    } else if constexpr (Op == C_IS_FIRST) {
      int s = 0; while (!act[g0 + s]) ++s;
      *out = (s == gl);
    } else {
      (void)out;
    }
  }
}

template <class R, int Op, int G, class T>
inline R msl_collective(const T& x, int64_t arg, unsigned line, const char* file) {
  static_assert(Op == C_FILL_DOWN || Op == C_FILL_UP || Op == C_BALLOT || Op == C_IS_FIRST || Op == C_ALL ||
                Op == C_ANY || Op == C_NOP || std::is_same<R, T>::value, "collective types");
  msl::Fiber* f = msl::tl_fiber;
  T in = x;
  R out;
  f->cfn = &coll_impl<T, R, Op, G>;
  f->cin = &in;
  f->cout = &out;
  f->carg = arg;
  f->cline = line;
  f->cfile = file;
  msl::block(msl::F_COLL);
  return out;
}

struct simd_vote {
  typedef ulong vote_t;
  uint64_t v, mask;
  explicit operator vote_t() const { return v; }
  bool all() const { return (v & mask) == mask; }
  bool any() const { return v != 0; }
};
typedef simd_vote quad_vote;

#define MSL_LOC unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()
#define MSL_COLL_REDUCE(pfx, G)                                                                             \
  template <class T> inline T pfx##_sum(T x, MSL_LOC) { return msl_collective<T, C_SUM, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_product(T x, MSL_LOC) { return msl_collective<T, C_PROD, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_max(T x, MSL_LOC) { return msl_collective<T, C_MAX, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_min(T x, MSL_LOC) { return msl_collective<T, C_MIN, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_and(T x, MSL_LOC) { return msl_collective<T, C_AND, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_or(T x, MSL_LOC) { return msl_collective<T, C_OR, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_xor(T x, MSL_LOC) { return msl_collective<T, C_XOR, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_prefix_inclusive_sum(T x, MSL_LOC) { return msl_collective<T, C_PINC_SUM, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_prefix_exclusive_sum(T x, MSL_LOC) { return msl_collective<T, C_PEXC_SUM, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_prefix_inclusive_product(T x, MSL_LOC) { return msl_collective<T, C_PINC_PROD, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_prefix_exclusive_product(T x, MSL_LOC) { return msl_collective<T, C_PEXC_PROD, G>(x, 0, line, file); } \
  template <class T> inline T pfx##_shuffle(T x, ushort l, MSL_LOC) { return msl_collective<T, C_SHUF, G>(x, l, line, file); } \
  template <class T> inline T pfx##_shuffle_down(T x, ushort d, MSL_LOC) { return msl_collective<T, C_SHUF_DOWN, G>(x, d, line, file); } \
  template <class T> inline T pfx##_shuffle_up(T x, ushort d, MSL_LOC) { return msl_collective<T, C_SHUF_UP, G>(x, d, line, file); } \
  template <class T> inline T pfx##_shuffle_xor(T x, ushort m, MSL_LOC) { return msl_collective<T, C_SHUF_XOR, G>(x, m, line, file); } \
  template <class T> inline T pfx##_shuffle_rotate_down(T x, ushort d, MSL_LOC) { return msl_collective<T, C_ROT_DOWN, G>(x, d, line, file); } \
  template <class T> inline T pfx##_shuffle_rotate_up(T x, ushort d, MSL_LOC) { return msl_collective<T, C_ROT_UP, G>(x, d, line, file); } \
  template <class T> inline T pfx##_broadcast(T x, ushort l, MSL_LOC) { return msl_collective<T, C_BCAST, G>(x, l, line, file); } \
  template <class T> inline T pfx##_broadcast_first(T x, MSL_LOC) { return msl_collective<T, C_BCAST_FIRST, G>(x, 0, line, file); } \
  inline bool pfx##_all(bool x, MSL_LOC) { return msl_collective<bool, C_ALL, G>(x, 0, line, file); } \
  inline bool pfx##_any(bool x, MSL_LOC) { return msl_collective<bool, C_ANY, G>(x, 0, line, file); } \
  inline simd_vote pfx##_ballot(bool x, MSL_LOC) { return msl_collective<simd_vote, C_BALLOT, G>(x, 0, line, file); } \
  inline bool pfx##_is_first(MSL_LOC) { return msl_collective<bool, C_IS_FIRST, G>(false, 0, line, file); } \
  inline simd_vote pfx##_active_threads_mask(MSL_LOC) { return msl_collective<simd_vote, C_BALLOT, G>(true, 0, line, file); } \
  template <class T> inline T pfx##_shuffle_and_fill_down(T data, T filling, ushort delta, MSL_LOC) { \
    return msl_collective<T, C_FILL_DOWN, G>(FillPair<T>{data, filling}, int64_t(delta) | (int64_t(G) << 16), line, file); } \
  template <class T> inline T pfx##_shuffle_and_fill_down(T data, T filling, ushort delta, ushort modulo, MSL_LOC) { \
    return msl_collective<T, C_FILL_DOWN, G>(FillPair<T>{data, filling}, int64_t(delta) | (int64_t(modulo) << 16), line, file); } \
  template <class T> inline T pfx##_shuffle_and_fill_up(T data, T filling, ushort delta, MSL_LOC) { \
    return msl_collective<T, C_FILL_UP, G>(FillPair<T>{data, filling}, int64_t(delta) | (int64_t(G) << 16), line, file); } \
  template <class T> inline T pfx##_shuffle_and_fill_up(T data, T filling, ushort delta, ushort modulo, MSL_LOC) { \
    return msl_collective<T, C_FILL_UP, G>(FillPair<T>{data, filling}, int64_t(delta) | (int64_t(modulo) << 16), line, file); }
MSL_COLL_REDUCE(simd, 32)
MSL_COLL_REDUCE(quad, 4)
#undef MSL_COLL_REDUCE

inline void simdgroup_barrier(mem_flags = mem_flags::mem_none, MSL_LOC) {
  msl_collective<bool, C_NOP, 32>(false, 0, line, file);
}
inline bool simd_is_helper_thread() { return false; }  // compute kernels have no helper threads
#undef MSL_LOC

}  // namespace metal

// ---- address-space-typed pointers (guarded mode only). The build step rewrites `device T*`,
// `constant T*` and `threadgroup T*` (in the kernel text and in MLX's signature) into
// msl::ptr<T, AS> / msl::cptr<T, AS> (`const T` pointee), so that, as in Metal:
//   - a device, constant or threadgroup pointer does not convert to a `thread` (plain) pointer,
//     nor to a pointer of another address space (g++ reports the line: "use of deleted function
//     ... operator U*" or "cannot convert");
//   - a const pointer does not convert to a non-const one; casts keep the address space;
// and every access through a pointer derived from a buffer argument or a threadgroup array (by
// indexing, arithmetic or casts) is checked against that buffer's or array's extent. A raw pointer
// (`&x[i]`) converts to any address space, unchecked.
namespace msl {
enum AddressSpace { AS_DEVICE = 1, AS_CONSTANT = 2, AS_THREADGROUP = 3 };

template <class T, int AS> struct ptr;

template <class T, int AS>
struct cptr {
  char* base = nullptr;  // start of the buffer or array
  int64_t off = 0;       // byte offset of this pointer from base
  int64_t lo = 0, hi = 0;  // valid bytes [lo, hi) relative to base (checked when name is set)
  const char* name = nullptr;
  int64_t unit = 1;      // element size of the named buffer, for messages
  cptr() = default;
  cptr(std::nullptr_t) {}
  cptr(const T* p) : base((char*)p) {}
  cptr(char* b, int64_t o, int64_t l, int64_t h, const char* n, int64_t u)
      : base(b), off(o), lo(l), hi(h), name(n), unit(u) {}
  template <class U, class = std::enable_if_t<!std::is_same<U, T>::value>>
  explicit cptr(const cptr<U, AS>& o) : base(o.base), off(o.off), lo(o.lo), hi(o.hi), name(o.name), unit(o.unit) {}
  const T& at(int64_t i) const {
    int64_t b = off + i * (int64_t)sizeof(T);
    if (name && (b < lo || b + (int64_t)sizeof(T) > hi)) {
      char where[96];
      fail("out-of-bounds access in kernel '%s': %s[%lld] is outside the %s's elements [%lld, %lld) (at %s)",
           g_launch->kernel_name, name, (long long)(b >= 0 ? b / unit : -((-b + unit - 1) / unit)),
           AS == AS_THREADGROUP ? "array" : "buffer", (long long)(lo / unit), (long long)(hi / unit),
           where_thread(where, sizeof(where)));
      static thread_local char dummy[sizeof(T) < 64 ? 64 : sizeof(T)] __attribute__((aligned(16)));
      __builtin_memset(dummy, 0xff, sizeof(dummy));
      return *reinterpret_cast<const T*>(dummy);
    }
    return *reinterpret_cast<const T*>(base + b);
  }
  const T& operator[](int64_t i) const { return at(i); }
  const T& operator*() const { return at(0); }
  const T* operator->() const { return &at(0); }
  cptr operator+(int64_t i) const { cptr r = *this; r.off += i * (int64_t)sizeof(T); return r; }
  cptr operator-(int64_t i) const { return *this + (-i); }
  int64_t operator-(const cptr& o) const { return (off - o.off) / (int64_t)sizeof(T); }
  cptr& operator+=(int64_t i) { off += i * (int64_t)sizeof(T); return *this; }
  cptr& operator-=(int64_t i) { return *this += -i; }
  cptr& operator++() { return *this += 1; }
  cptr operator++(int) { cptr r = *this; *this += 1; return r; }
  cptr& operator--() { return *this -= 1; }
  const char* addr() const { return base + off; }
  bool operator==(const cptr& o) const { return addr() == o.addr(); }
  bool operator!=(const cptr& o) const { return addr() != o.addr(); }
  bool operator<(const cptr& o) const { return addr() < o.addr(); }
  explicit operator bool() const { return base != nullptr; }
  // Metal does not convert an address-space pointer to a thread pointer or to another space.
  template <class U> operator U*() const = delete;
};
template <class T, int AS> inline cptr<T, AS> operator+(int64_t i, const cptr<T, AS>& p) { return p + i; }

template <class T, int AS>
struct ptr : cptr<T, AS> {
  typedef cptr<T, AS> base_t;
  ptr() = default;
  ptr(std::nullptr_t) {}
  ptr(T* p) : base_t(p) {}
  ptr(char* b, int64_t o, int64_t l, int64_t h, const char* n, int64_t u) : base_t(b, o, l, h, n, u) {}
  template <class U>  // casts: another element type, or casting const away, within the address space
  explicit ptr(const cptr<U, AS>& o) : base_t(o.base, o.off, o.lo, o.hi, o.name, o.unit) {}
  T& operator[](int64_t i) const { return const_cast<T&>(base_t::at(i)); }
  T& operator*() const { return (*this)[0]; }
  T* operator->() const { return &(*this)[0]; }
  ptr operator+(int64_t i) const { ptr r = *this; r.off += i * (int64_t)sizeof(T); return r; }
  ptr operator-(int64_t i) const { return *this + (-i); }
  int64_t operator-(const cptr<T, AS>& o) const { return base_t::operator-(o); }
  ptr& operator+=(int64_t i) { base_t::operator+=(i); return *this; }
  ptr& operator-=(int64_t i) { base_t::operator-=(i); return *this; }
  ptr& operator++() { base_t::operator+=(1); return *this; }
  ptr operator++(int) { ptr r = *this; base_t::operator+=(1); return r; }
  ptr& operator--() { base_t::operator-=(1); return *this; }
};
template <class T, int AS> inline ptr<T, AS> operator+(int64_t i, const ptr<T, AS>& p) { return p + i; }

// The element type a pointer-like object points at (raw pointers, msl::ptr/cptr, threadgroup arrays).
template <class P> struct pointee;
template <class T> struct pointee<T*> { typedef std::remove_const_t<T> type; };
template <class T, int AS> struct pointee<cptr<T, AS>> { typedef T type; };
template <class T, int AS> struct pointee<ptr<T, AS>> { typedef T type; };
}  // namespace msl

// ---- guarded threadgroup arrays (guarded mode only): `threadgroup T name[N];` becomes a
// tg_array<T, N> whose indexing is checked; it converts to a threadgroup-space msl::ptr (never to a
// thread pointer) carrying its bounds.
namespace msl {
template <class T, int64_t N>
struct tg_array {
  T v[N];
  T& operator[](int64_t i) {
    if (i < 0 || i >= N) {
      char where[96];
      fail("out-of-bounds threadgroup memory access in kernel '%s': index %lld of a threadgroup array "
           "of %lld elements (at %s)", g_launch->kernel_name, (long long)i, (long long)N,
           where_thread(where, sizeof(where)));
      static thread_local char dummy[sizeof(T) < 64 ? 64 : sizeof(T)] __attribute__((aligned(16)));
      return *reinterpret_cast<T*>(dummy);
    }
    return v[i];
  }
  const T& operator[](int64_t i) const { return const_cast<tg_array*>(this)->operator[](i); }
  operator ptr<T, AS_THREADGROUP>() {
    return ptr<T, AS_THREADGROUP>((char*)v, 0, 0, N * (int64_t)sizeof(T), "threadgroup array", sizeof(T));
  }
  operator cptr<T, AS_THREADGROUP>() const {
    return cptr<T, AS_THREADGROUP>((char*)v, 0, 0, N * (int64_t)sizeof(T), "threadgroup array", sizeof(T));
  }
  ptr<T, AS_THREADGROUP> operator+(int64_t i) { return ptr<T, AS_THREADGROUP>(*this) + i; }
  cptr<T, AS_THREADGROUP> operator+(int64_t i) const { return cptr<T, AS_THREADGROUP>(*this) + i; }
  template <class U> explicit operator ptr<U, AS_THREADGROUP>() { return ptr<U, AS_THREADGROUP>(ptr<T, AS_THREADGROUP>(*this)); }
  template <class U> explicit operator cptr<U, AS_THREADGROUP>() const { return cptr<U, AS_THREADGROUP>(cptr<T, AS_THREADGROUP>(*this)); }
};
template <class T, int64_t N> struct pointee<tg_array<T, N>> { typedef T type; };
template <class T, size_t N> struct pointee<T[N]> { typedef std::remove_const_t<T> type; };
}  // namespace msl

// ---- SIMD-group matrices (MSL spec 2.4, 6.7): simdgroup_matrix<T, 8, 8>, T float, half or bfloat.
// Every operation is a collective of the whole simdgroup: all its threads must reach the same call
// with the same arguments (uniform control flow), else the launch fails naming the line. Each
// thread holds the whole matrix; it owns two elements of it -- row fm, columns fn and fn + 1, with
// the lane mapping MLX's kernels rely on (steel/gemm/mma.h) -- which `thread_elements()` exposes.
// A collective assembles each operand from its owners, so writes through thread_elements() take
// effect as on the GPU. multiply_accumulate computes each element in float, c + sum_k a_ik b_kj with
// one fused multiply-add per k in order, rounded once to T (Apple leaves the order unspecified).
namespace metal {
template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "Metal has 8x8 SIMD-group matrices only");
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value || std::is_same<T, bfloat>::value,
                "SIMD-group matrices hold float, half or bfloat");
  alignas(16) T e[64];  // row-major: e[r * 8 + c]
  simdgroup_matrix() { __builtin_memset((void*)e, 0xff, sizeof(e)); }  // unset: NaN, as garbage would be
  explicit simdgroup_matrix(T d) { for (int i = 0; i < 64; ++i) e[i] = (i / 8 == i % 8) ? d : T(0); }
  vec<T, 2>& thread_elements() {
    uint lane = msl::tl_fiber->tid % 32;
    uint q = lane / 4, fm = (q & 4) + (lane / 2) % 4, fn = (q & 2) * 2 + (lane % 2) * 2;
    return *reinterpret_cast<vec<T, 2>*>(&e[fm * 8 + fn]);
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int C, int R>
inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, C, R> m;
  for (int i = 0; i < 64; ++i) m.e[i] = v;
  return m;
}

// The lane owning each element (row-major) of a matrix.
struct MatOwners {
  int lane[64];
  constexpr MatOwners() : lane() {
    for (int l = 0; l < 32; ++l) {
      int q = l / 4, fm = (q & 4) + (l / 2) % 4, fn = (q & 2) * 2 + (l % 2) * 2;
      lane[fm * 8 + fn] = l;
      lane[fm * 8 + fn + 1] = l;
    }
  }
};
inline constexpr MatOwners msl_mat_owners{};

enum { MAT_LOAD, MAT_STORE, MAT_MMA, MAT_MUL };
template <class T, class P>
struct MatArgs {
  int kind;
  simdgroup_matrix<T, 8, 8>* d;
  const simdgroup_matrix<T, 8, 8>* a;
  const simdgroup_matrix<T, 8, 8>* b;
  const simdgroup_matrix<T, 8, 8>* c;
  P* mem;  // the source or destination pointer-like object (load, store)
  ulong epr;
  ulong ox, oy;
  bool transpose;
  const char* what;
};
template <class P> inline const void* msl_addr_of(const P& p) {
  if constexpr (std::is_pointer<P>::value) return (const void*)p;
  else return (const void*)p.addr();
}
template <class T, int64_t N> inline const void* msl_addr_of(const msl::tg_array<T, N>& p) { return (const void*)p.v; }
template <class T, size_t N> inline const void* msl_addr_of(const T (&p)[N]) { return (const void*)p; }

// Element (r, c) of the matrix <-> memory element (origin.y + r) * epr + origin.x + c; with
// transpose_matrix, (origin.y + c) * epr + origin.x + r (origin = (column, row) of the source).
inline ulong msl_mat_index(int r, int c, ulong epr, ulong ox, ulong oy, bool transpose) {
  return transpose ? (oy + c) * epr + ox + r : (oy + r) * epr + ox + c;
}

template <class T, class P>
void msl_mat_impl(msl::Fiber** parts, int n) {
  msl::Worker* w = msl::tl_worker;
  const MatArgs<T, P>* args0 = (const MatArgs<T, P>*)parts[0]->cin;
  int sg = parts[0]->tid / 32;
  int sg_size = w->n - sg * 32 < 32 ? w->n - sg * 32 : 32;
  if (sg_size != 32) {
    msl::fail("%s at %s:%u in kernel '%s': the simdgroup has %d threads; SIMD-group matrices need all 32",
              args0->what, parts[0]->cfile, parts[0]->cline, msl::g_launch->kernel_name, sg_size);
    return;
  }
  if (n != sg_size) {
    msl::fail("%s at %s:%u in kernel '%s': %d of the simdgroup's %d threads took part; SIMD-group "
              "matrix operations need uniform control flow in the simdgroup",
              args0->what, parts[0]->cfile, parts[0]->cline, msl::g_launch->kernel_name, n, sg_size);
    return;
  }
  for (int i = 1; i < n; ++i) {
    const MatArgs<T, P>* ai = (const MatArgs<T, P>*)parts[i]->cin;
    bool same = ai->epr == args0->epr && ai->ox == args0->ox && ai->oy == args0->oy &&
                ai->transpose == args0->transpose &&
                (args0->mem == nullptr || msl_addr_of(*ai->mem) == msl_addr_of(*args0->mem));
    if (!same) {
      msl::fail("%s at %s:%u in kernel '%s': threads %u and %u of a simdgroup pass different pointers "
                "or layouts; SIMD-group matrix operations need the same arguments in every thread",
                args0->what, parts[0]->cfile, parts[0]->cline, msl::g_launch->kernel_name,
                parts[0]->tid, parts[i]->tid);
      return;
    }
  }
  auto assemble = [&](const simdgroup_matrix<T, 8, 8>* MatArgs<T, P>::*which, T* out) {
    for (int e = 0; e < 64; ++e) {
      int owner = msl_mat_owners.lane[e];
      const MatArgs<T, P>* ao = (const MatArgs<T, P>*)parts[owner]->cin;  // parts are in lane order
      out[e] = (ao->*which)->e[e];
    }
  };
  msl::Fiber* saved = msl::tl_fiber;
  msl::tl_fiber = parts[0];  // bounds-check messages name the simdgroup's first thread
  T result[64];
  if (args0->kind == MAT_LOAD) {
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c)
        result[r * 8 + c] = (*args0->mem)[msl_mat_index(r, c, args0->epr, args0->ox, args0->oy, args0->transpose)];
  } else if (args0->kind == MAT_STORE) {
    if constexpr (!std::is_const<P>::value) {  // (instantiated for stores only)
      T a[64];
      assemble(&MatArgs<T, P>::a, a);
      for (int r = 0; r < 8; ++r)
        for (int c = 0; c < 8; ++c)
          (*args0->mem)[msl_mat_index(r, c, args0->epr, args0->ox, args0->oy, args0->transpose)] = a[r * 8 + c];
    }
  } else {
    T a[64], b[64], c[64];
    assemble(&MatArgs<T, P>::a, a);
    assemble(&MatArgs<T, P>::b, b);
    if (args0->kind == MAT_MMA) assemble(&MatArgs<T, P>::c, c);
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) {
        float acc = args0->kind == MAT_MMA ? float(c[i * 8 + j]) : 0.0f;
        for (int k = 0; k < 8; ++k) acc = __builtin_fmaf(float(a[i * 8 + k]), float(b[k * 8 + j]), acc);
        result[i * 8 + j] = T(acc);
      }
  }
  msl::tl_fiber = saved;
  if (args0->kind != MAT_STORE)
    for (int i = 0; i < n; ++i) __builtin_memcpy(((const MatArgs<T, P>*)parts[i]->cin)->d->e, result, sizeof(result));
}

template <class T, class P>
inline void msl_mat_collective(const MatArgs<T, P>& args, unsigned line, const char* file) {
  msl::Fiber* f = msl::tl_fiber;
  f->cfn = &msl_mat_impl<T, P>;
  f->cin = &args;
  f->cout = nullptr;
  f->carg = 0;
  f->cline = line;
  f->cfile = file;
  msl::block(msl::F_COLL);
}

#define MSL_LOC unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()
template <class T, int C, int R, class P>
inline void simdgroup_load(simdgroup_matrix<T, C, R>& d, const P& src, ulong elements_per_row = C,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false, MSL_LOC) {
  static_assert(std::is_same<typename msl::pointee<P>::type, T>::value,
                "simdgroup_load: the source's element type must be the matrix's");
  MatArgs<T, const P> a{MAT_LOAD, &d, nullptr, nullptr, nullptr, &src, elements_per_row, matrix_origin.x,
                  matrix_origin.y, transpose_matrix, "simdgroup_load"};
  msl_mat_collective(a, line, file);
}
template <class T, int C, int R, class D>
inline void simdgroup_store(const simdgroup_matrix<T, C, R>& m, D&& dst, ulong elements_per_row = C,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false, MSL_LOC) {
  typedef std::remove_reference_t<D> P;
  static_assert(std::is_same<typename msl::pointee<std::remove_const_t<P>>::type, T>::value,
                "simdgroup_store: the destination's element type must be the matrix's");
  static_assert(!std::is_const<std::remove_reference_t<decltype(dst[0])>>::value,
                "simdgroup_store: the destination must not be const");
  MatArgs<T, P> a{MAT_STORE, nullptr, &m, nullptr, nullptr, &dst, elements_per_row, matrix_origin.x,
                  matrix_origin.y, transpose_matrix, "simdgroup_store"};
  msl_mat_collective(a, line, file);
}
template <class T>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                          const simdgroup_matrix<T, 8, 8>& b, const simdgroup_matrix<T, 8, 8>& c,
                                          MSL_LOC) {
  MatArgs<T, int*> args{MAT_MMA, &d, &a, &b, &c, nullptr, 0, 0, 0, false, "simdgroup_multiply_accumulate"};
  msl_mat_collective(args, line, file);
}
template <class T>
inline void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                               const simdgroup_matrix<T, 8, 8>& b, MSL_LOC) {
  MatArgs<T, int*> args{MAT_MUL, &d, &a, &b, nullptr, nullptr, 0, 0, 0, false, "simdgroup_multiply"};
  msl_mat_collective(args, line, file);
}
template <class T>
inline simdgroup_matrix<T, 8, 8> operator*(const simdgroup_matrix<T, 8, 8>& a, const simdgroup_matrix<T, 8, 8>& b) {
  simdgroup_matrix<T, 8, 8> d;
  simdgroup_multiply(d, a, b);
  return d;
}
#undef MSL_LOC
}  // namespace metal
