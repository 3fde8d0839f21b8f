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
  ucontext_t ctx;
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

static inline void block(int state) {
  Fiber* f = tl_fiber;
  f->state = state;
  f->spins = 0;
  tl_worker->progress = true;
  swapcontext(&f->ctx, &tl_worker->main_ctx);
}

// Called by atomic loads and compare-exchanges: a thread that keeps polling an atomic lets the
// other threads of its threadgroup run (a spin-wait on another thread would never end otherwise).
static const uint32_t SPIN_YIELD = 256;
static inline void spin_point() {
  Fiber* f = tl_fiber;
  if (!f) return;
  if (++f->spins % SPIN_YIELD == 0) {
    tl_worker->yielded = true;
    swapcontext(&f->ctx, &tl_worker->main_ctx);
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
  // returns to main_ctx through uc_link
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
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = w->stacks + (size_t)i * w->stack_size;
    f->ctx.uc_stack.ss_size = w->stack_size;
    f->ctx.uc_link = &w->main_ctx;
    makecontext(&f->ctx, fiber_main, 0);
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
      swapcontext(&w->main_ctx, &f->ctx);
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
              C_BCAST_FIRST, C_ALL, C_ANY, C_BALLOT, C_IS_FIRST, C_NOP };

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
  inline bool pfx##_is_first(MSL_LOC) { return msl_collective<bool, C_IS_FIRST, G>(false, 0, line, file); }
MSL_COLL_REDUCE(simd, 32)
MSL_COLL_REDUCE(quad, 4)
#undef MSL_COLL_REDUCE

inline void simdgroup_barrier(mem_flags = mem_flags::mem_none, MSL_LOC) {
  msl_collective<bool, C_NOP, 32>(false, 0, line, file);
}
#undef MSL_LOC

}  // namespace metal

// ---- guarded pointers (guarded mode only): every access through a kernel's buffer argument is
// checked against the buffer's extent; the first violation fails the launch.
namespace msl {
template <class T>
struct guarded {
  T* p;       // element 0 of the buffer as the kernel sees it
  int64_t off;  // offset of this pointer from element 0
  int64_t lo, hi;
  const char* name;
  guarded() = default;
  guarded(T* p_, int64_t off_, int64_t lo_, int64_t hi_, const char* n) : p(p_), off(off_), lo(lo_), hi(hi_), name(n) {}
  T& at(int64_t i) const {
    int64_t k = off + i;
    if (k < lo || k >= hi) {
      char where[96];
      fail("out-of-bounds access in kernel '%s': %s[%lld] is outside the buffer's elements [%lld, %lld) "
           "(at %s)", g_launch->kernel_name, name, (long long)k, (long long)lo, (long long)hi,
           where_thread(where, sizeof(where)));
      static thread_local char dummy[64] __attribute__((aligned(16)));
      __builtin_memset(dummy, 0xff, sizeof(dummy));
      return *reinterpret_cast<T*>(dummy);
    }
    return p[k];
  }
  T& operator[](int64_t i) const { return at(i); }
  T& operator*() const { return at(0); }
  T* operator->() const { return &at(0); }
  guarded operator+(int64_t i) const { return guarded(p, off + i, lo, hi, name); }
  guarded operator-(int64_t i) const { return guarded(p, off - i, lo, hi, name); }
  int64_t operator-(const guarded& o) const { return off - o.off; }
  guarded& operator+=(int64_t i) { off += i; return *this; }
  guarded& operator-=(int64_t i) { off -= i; return *this; }
  guarded& operator++() { ++off; return *this; }
  guarded operator++(int) { guarded r = *this; ++off; return r; }
  // Escaping to a raw pointer (casts, passing to helpers) drops the checks.
  template <class U> operator U*() const { return (U*)(p + off); }
  explicit operator bool() const { return p != nullptr; }
};
}  // namespace msl

// ---- guarded threadgroup arrays (guarded mode only): `threadgroup T name[N];` becomes a
// tg_array<T, N> whose indexing is checked; it converts to T* where the kernel takes its address.
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
  operator T*() { return v; }
  operator const T*() const { return v; }
};
}  // namespace msl
