// The CUDA built-ins the twin's kernels use, for compiling them with the host C++ compiler.
//
// A kernel is launched over a grid of blocks; the blocks run one after another on the calling OS
// thread. Inside a block, the threads run in one of two ways, chosen per module when it is built:
//
// - loop: the module has no barrier, shuffle or shared memory, so its threads cannot observe one
//   another; each thread runs to completion in a plain loop (thread 0, 1, ...).
// - fibers: every thread of the block is a fiber with its own stack. A thread runs until it reaches a
//   barrier (__syncthreads, __syncwarp, a warp shuffle or vote) and then hands over to the next ready
//   thread (a user-space context switch), so each barrier is a real rendezvous of all live threads of
//   the block (or the warp). Threads are taken in forward, reverse or a seeded shuffled order.
//
// Threads that return early leave every barrier (as warps that exit do on a GPU). A barrier that can
// never complete (threads waiting at different barriers with nobody left to run), a shuffle that reads
// a lane that has exited, or a barrier reached in a loop-mode module stops the launch with an error.
//
// __shared__ variables are function-local statics, shared by the threads of the block being run (the
// blocks run one at a time, and launches of one library one at a time: emu_launch holds a lock);
// dynamic shared memory (extern __shared__) is a per-launch buffer.
//
// A memory fault during a launch (an access past an array's end hits the guard page that follows
// every emulated allocation; a fiber stack has a guard page too) is caught and returned as the
// launch's error. The fibers need x86-64 (the context switch is written in its assembly).
#pragma once

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <cstdio>
#include <type_traits>
#include <utility>
#include <csetjmp>
#include <csignal>
#include <sys/mman.h>

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

// ------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() emu_syncthreads()

struct dim3 {
  unsigned int x, y, z;
};

// ------------------------------------------------------------------------------ launch state
enum { EMU_MAX_THREADS = 1024, EMU_WARP = 32, EMU_STACK = 256 * 1024 };
enum { EMU_READY = 0, EMU_AT_BARRIER = 1, EMU_AT_WARP = 2, EMU_DONE = 3 };

struct EmuThread {
  void* sp;          // saved stack pointer while suspended
  char* stack;       // the mapped stack (lowest address; a guard page below)
  int state;
  unsigned int linear;
  unsigned int position;  // where this thread is in the scheduler's order
  long long exchanges;    // warp exchanges (shuffles, votes) this thread has made
  dim3 idx;
};

// Warp exchanges alternate between two sets of slots, so one barrier per exchange suffices: a lane can
// only write a set again after every lane has passed the next exchange's barrier, that is, has read.
struct EmuWarp {
  int live;          // threads of this warp not yet returned
  int arrived;       // threads waiting at the warp barrier
  unsigned long long slots[2][EMU_WARP];
  long long stamp[2][EMU_WARP];  // the exchange number each slot was written for (-1: never)
};

struct EmuState {
  dim3 grid, block, block_idx;
  unsigned int nthreads;
  int mode;            // 0 loop, 1 fibers
  EmuThread* cur;      // the running thread
  EmuThread threads[EMU_MAX_THREADS];
  EmuWarp warps[EMU_MAX_THREADS / EMU_WARP];
  int live;            // threads of the block not yet returned
  int arrived;         // threads waiting at __syncthreads
  void* sched_sp;
  const unsigned int* order;  // the order threads are resumed in
  char* dyn_shared;
  unsigned long long dyn_shared_size;
  void (*body)(void**);
  void** args;
  int error;
  char message[512];
  char* stacks[EMU_MAX_THREADS];
};

static EmuState* emu = nullptr;  // launches of one library are serialised (emu_launch)

#define threadIdx (emu->cur->idx)
#define blockIdx (emu->block_idx)
#define blockDim (emu->block)
#define gridDim (emu->grid)
#define warpSize 32

__attribute__((format(printf, 1, 2))) static void emu_fail(const char* fmt, ...);
static void emu_fail(const char* fmt, ...) {
  if (emu->error) return;
  emu->error = 1;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(emu->message, sizeof(emu->message), fmt, ap);
  va_end(ap);
}

// ------------------------------------------------------------------------------ fibers (x86-64)
extern "C" void emu_switch(void** save_sp, void* next_sp) __attribute__((visibility("hidden")));
extern "C" void emu_fiber_start() __attribute__((visibility("hidden")));
asm(R"(
    .text
    .p2align 4
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
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
    .size emu_switch, .-emu_switch

    .p2align 4
    .globl emu_fiber_start
    .hidden emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_fiber_start, .-emu_fiber_start
)");

static inline void emu_set_state(EmuThread* t, int state) { t->state = state; }

// The next ready thread after the running one in the scheduler's order (cyclically); null when none
// is ready or an error stopped the launch. (Preferring the earliest ready thread, to keep one warp's
// stacks in cache through its shuffles, measured no faster.)
static EmuThread* emu_pick_next() {
  if (emu->error) return nullptr;
  const unsigned int n = emu->nthreads;
  unsigned int p = emu->cur->position;
  for (unsigned int step = 0; step < n; ++step) {
    p = p + 1 == n ? 0 : p + 1;
    EmuThread* t = &emu->threads[emu->order[p]];
    if (t->state == EMU_READY) return t;
  }
  return nullptr;
}

// The running thread (already marked waiting or done) hands over to the next ready thread directly,
// or to the scheduler when there is none; returns when it is resumed.
static void emu_hand_over() {
  EmuThread* self = emu->cur;
  EmuThread* next = emu_pick_next();
  if (next == nullptr) {
    emu_switch(&self->sp, emu->sched_sp);
  } else {
    emu->cur = next;
    emu_switch(&self->sp, next->sp);
  }
  emu->cur = self;
}

static void emu_thread_exit();

static void emu_fiber_main(EmuThread* t) {
  emu->cur = t;
  emu->body(emu->args);
  emu_thread_exit();
  emu_hand_over();  // never resumed
}

static void emu_fiber_init(EmuThread* t) {
  // emu_switch pops r15, r14, r13, r12, rbx, rbp, then returns into emu_fiber_start, which calls
  // r13(r12) with the stack 16-byte aligned. (The kernels never change the floating-point control
  // registers, so the switch does not carry them.) The tops are staggered by the thread's number:
  // stacks a multiple of 4 KiB apart would otherwise all fall into the same cache sets.
  char* top = t->stack + EMU_STACK - (t->linear * 208u) % 4096u;  // still 16-byte aligned
  unsigned long long* sp = (unsigned long long*)(top - 120);  // sp[6] is the return address, 8 mod 16
  sp[0] = 0;                                     // r15
  sp[1] = 0;                                     // r14
  sp[2] = (unsigned long long)&emu_fiber_main;   // r13: what emu_fiber_start calls
  sp[3] = (unsigned long long)t;                 // r12: its argument
  sp[4] = 0;                                     // rbx
  sp[5] = 0;                                     // rbp
  sp[6] = (unsigned long long)&emu_fiber_start;  // return address
  t->sp = sp;
  t->exchanges = 0;
}

// ------------------------------------------------------------------------------ barriers
static void emu_release_block() {
  emu->arrived = 0;
  for (unsigned int k = 0; k < emu->nthreads; ++k)
    if (emu->threads[k].state == EMU_AT_BARRIER) emu_set_state(&emu->threads[k], EMU_READY);
}

static void emu_release_warp(unsigned int w) {
  emu->warps[w].arrived = 0;
  const unsigned int end = (w + 1) * EMU_WARP < emu->nthreads ? (w + 1) * EMU_WARP : emu->nthreads;
  for (unsigned int k = w * EMU_WARP; k < end; ++k)
    if (emu->threads[k].state == EMU_AT_WARP) emu_set_state(&emu->threads[k], EMU_READY);
}

static void emu_thread_exit() {
  if (emu->mode == 0) return;
  EmuThread* t = emu->cur;
  emu_set_state(t, EMU_DONE);
  emu->live -= 1;
  EmuWarp& w = emu->warps[t->linear / EMU_WARP];
  w.live -= 1;
  if (emu->arrived > 0 && emu->arrived == emu->live) emu_release_block();
  if (w.arrived > 0 && w.arrived == w.live) emu_release_warp(t->linear / EMU_WARP);
}

static bool emu_need_fibers(const char* what) {
  if (emu->mode == 1) return true;
  emu_fail("%s in a kernel built for loop execution (no barrier was found in its source)", what);
  return false;
}

static void emu_syncthreads() {
  if (!emu_need_fibers("__syncthreads()") || emu->error) return;
  emu->arrived += 1;
  if (emu->arrived == emu->live) {
    emu_release_block();
    return;
  }
  emu_set_state(emu->cur, EMU_AT_BARRIER);
  emu_hand_over();
}

static void emu_warp_barrier() {
  EmuThread* t = emu->cur;
  const unsigned int w = t->linear / EMU_WARP;
  EmuWarp& warp = emu->warps[w];
  warp.arrived += 1;
  if (warp.arrived == warp.live) {
    emu_release_warp(w);
    return;
  }
  emu_set_state(t, EMU_AT_WARP);
  emu_hand_over();
}

static inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  (void)mask;
  if (!emu_need_fibers("__syncwarp()") || emu->error) return;
  emu_warp_barrier();
}

static inline unsigned int emu_lane() { return emu->cur->linear % EMU_WARP; }

// Every live lane of the warp posts a value, then reads lane src's (src outside [0, 32): its own).
static unsigned long long emu_exchange(unsigned long long bits, int src, const char* what) {
  if (!emu_need_fibers(what) || emu->error) return bits;
  EmuThread* t = emu->cur;
  const unsigned int w = t->linear / EMU_WARP, lane = t->linear % EMU_WARP;
  EmuWarp& warp = emu->warps[w];
  const long long round = t->exchanges++;
  const int set = (int)(round & 1);
  warp.slots[set][lane] = bits;
  warp.stamp[set][lane] = round;
  emu_warp_barrier();  // every live lane has posted
  if (src < 0 || src >= EMU_WARP) return bits;
  if (warp.stamp[set][src] != round) {
    emu_fail("%s: lane %u of warp %u (block %u,%u,%u) reads lane %d, which has exited or does not exist",
             what, lane, w, emu->block_idx.x, emu->block_idx.y, emu->block_idx.z, src);
    return bits;
  }
  return warp.slots[set][src];
}

template <typename V>
static inline V emu_shuffle(V v, int src, const char* what) {
  static_assert(sizeof(V) <= 8, "shuffle of a type wider than 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  bits = emu_exchange(bits, src, what);
  V out;
  std::memcpy(&out, &bits, sizeof(V));
  return out;
}

// The source lane of a shuffle within segments of `width` lanes (CUDA's rules).
template <typename V>
static inline V __shfl_sync(unsigned int, V v, int src_lane, int width = 32) {
  const int lane = (int)emu_lane();
  const int base = lane & ~(width - 1);
  return emu_shuffle(v, base + (src_lane & (width - 1)), "__shfl_sync");
}
template <typename V>
static inline V __shfl_down_sync(unsigned int, V v, unsigned int delta, int width = 32) {
  const int lane = (int)emu_lane();
  const int seg = lane & (width - 1);
  const int src = seg + (int)delta < width ? lane + (int)delta : -1;  // out of the segment: own value
  return emu_shuffle(v, src, "__shfl_down_sync");
}
template <typename V>
static inline V __shfl_up_sync(unsigned int, V v, unsigned int delta, int width = 32) {
  const int lane = (int)emu_lane();
  const int seg = lane & (width - 1);
  const int src = seg - (int)delta >= 0 ? lane - (int)delta : -1;
  return emu_shuffle(v, src, "__shfl_up_sync");
}
template <typename V>
static inline V __shfl_xor_sync(unsigned int, V v, int mask, int width = 32) {
  const int lane = (int)emu_lane();
  const int src = lane ^ mask;
  const int ok = (src & ~(width - 1)) == (lane & ~(width - 1));
  return emu_shuffle(v, ok ? src : -1, "__shfl_xor_sync");
}

static unsigned int emu_ballot(int pred, const char* what) {
  if (!emu_need_fibers(what) || emu->error) return 0;
  EmuThread* t = emu->cur;
  const unsigned int w = t->linear / EMU_WARP, lane = t->linear % EMU_WARP;
  EmuWarp& warp = emu->warps[w];
  const long long round = t->exchanges++;
  const int set = (int)(round & 1);
  warp.slots[set][lane] = pred != 0;
  warp.stamp[set][lane] = round;
  emu_warp_barrier();
  unsigned int bits = 0;
  for (int k = 0; k < EMU_WARP; ++k)
    if (warp.stamp[set][k] == round && warp.slots[set][k]) bits |= 1u << k;
  return bits;
}
static inline unsigned int __ballot_sync(unsigned int mask, int pred) {
  return emu_ballot(pred, "__ballot_sync") & mask;
}
static inline int __any_sync(unsigned int mask, int pred) { return (emu_ballot(pred, "__any_sync") & mask) != 0; }
static inline int __all_sync(unsigned int mask, int pred) {
  const unsigned int live = emu_ballot(1, "__all_sync") & mask;
  return (emu_ballot(pred, "__all_sync") & live) == live;
}
static inline unsigned int __activemask() { return 0xffffffffu; }
static inline void __threadfence() {}
static inline void __threadfence_block() {}
[[noreturn]] static inline void __trap() { std::abort(); }

// ------------------------------------------------------------------------------ atomics
template <typename V>
static inline V atomicAdd(V* p, V v) {
  if constexpr (std::is_integral<V>::value) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    V old = *p;
    *p = old + v;
    return old;
  }
}
template <typename V>
static inline V atomicSub(V* p, V v) { return atomicAdd(p, (V)(-v)); }
template <typename V>
static inline V atomicMax(V* p, V v) { V old = *p; if (v > old) *p = v; return old; }
template <typename V>
static inline V atomicMin(V* p, V v) { V old = *p; if (v < old) *p = v; return old; }
template <typename V>
static inline V atomicExch(V* p, V v) { V old = *p; *p = v; return old; }
template <typename V>
static inline V atomicCAS(V* p, V compare, V v) { V old = *p; if (old == compare) *p = v; return old; }

// ------------------------------------------------------------------------------ math
using std::abs;
using std::ceil;
using std::cos;
using std::erf;
using std::erfc;
using std::exp;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::log;
using std::log1p;
using std::expm1;
using std::pow;
using std::round;
using std::sin;
using std::sqrt;
using std::tanh;
using std::trunc;

static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
static inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
static inline double normcdf(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752440); }
static inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752440f); }
// __expf, __logf, fminf and fmaxf come with glibc's <math.h>
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
static inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
static inline unsigned int __float_as_uint(float f) { unsigned int v; std::memcpy(&v, &f, 4); return v; }
static inline float __uint_as_float(unsigned int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
static inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
static inline int __popc(unsigned int v) { return __builtin_popcount(v); }
static inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
static inline int __clz(unsigned int v) { return v ? __builtin_clz(v) : 32; }
static inline int __ffs(unsigned int v) { return __builtin_ffs((int)v); }
template <typename V>
static inline V __ldg(const V* p) { return *p; }

template <typename A, typename B>
static inline typename std::common_type<A, B>::type min(A a, B b) {
  typedef typename std::common_type<A, B>::type C;
  return (C)b < (C)a ? (C)b : (C)a;
}
template <typename A, typename B>
static inline typename std::common_type<A, B>::type max(A a, B b) {
  typedef typename std::common_type<A, B>::type C;
  return (C)a < (C)b ? (C)b : (C)a;
}

// ------------------------------------------------------------------------------ CuPy's arrays
// The layout Python fills in (tests/emulation/kernels.py): data, size, ndim, shape[], strides[] in
// bytes. Indexing by a flat index unravels it over the shape (C order); by an indexer, uses its index.
enum { EMU_MAX_NDIM = 12 };

struct CIndexer {
  long long size_;
  long long ndim_;
  long long shape_[EMU_MAX_NDIM];
  long long index_[EMU_MAX_NDIM];
  long long size() const { return size_; }
  void set(long long i) {
    for (long long k = ndim_ - 1; k >= 0; --k) {
      const long long n = shape_[k];
      index_[k] = i % n;
      i /= n;
    }
  }
  const long long* get() const { return index_; }
};

template <typename V>
struct CArray {
  V* data_;
  long long size_;
  long long ndim_;
  long long shape_[EMU_MAX_NDIM];
  long long strides_[EMU_MAX_NDIM];
  long long contiguous_;
  long long size() const { return size_; }
  V* data() const { return data_; }
  const long long* shape() const { return shape_; }
  const long long* strides() const { return strides_; }
  V& operator[](const long long* index) const {
    long long off = 0;
    for (long long k = 0; k < ndim_; ++k) off += index[k] * strides_[k];
    return *(V*)((char*)data_ + off);
  }
  V& operator[](long long i) const {
    if (contiguous_) return data_[i];
    long long off = 0;
    for (long long k = ndim_ - 1; k >= 0; --k) {
      const long long n = shape_[k];
      off += (i % n) * strides_[k];
      i /= n;
    }
    return *(V*)((char*)data_ + off);
  }
};

// ------------------------------------------------------------------------------ launching
// How a compiled function is called with CuPy's argument list: args[k] points at the k-th value.
template <typename... A, std::size_t... I>
static void emu_apply(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<typename std::remove_reference<A>::type*>(args[I])...);
}
template <typename... A>
static void emu_call(void (*f)(A...), void** args) {
  emu_apply(f, args, std::index_sequence_for<A...>{});
}

// One character per parameter: p pointer, f floating, i signed integer, u unsigned, b bool, s struct;
// then its size in bytes, and for pointers the pointee's kind and size (v and 0 for void).
template <typename A>
static constexpr char emu_kind() {
  typedef typename std::remove_cv<A>::type B;
  if (std::is_pointer<B>::value) return 'p';
  if (std::is_same<B, bool>::value) return 'b';
  if (std::is_floating_point<B>::value) return 'f';
  if (std::is_integral<B>::value) return std::is_signed<B>::value ? 'i' : 'u';
  if (std::is_void<B>::value) return 'v';
  return 's';
}
template <typename A>
static constexpr int emu_size() {
  if constexpr (std::is_void<A>::value) return 0; else return (int)sizeof(A);
}
template <typename... A>
static int emu_signature(void (*)(A...), char* kinds, int* sizes, char* pointee_kinds, int* pointee_sizes) {
  const char k[] = {emu_kind<A>()..., 0};
  const int s[] = {emu_size<A>()..., 0};
  const char pk[] = {emu_kind<typename std::remove_pointer<A>::type>()..., 0};
  const int ps[] = {emu_size<typename std::remove_cv<typename std::remove_pointer<A>::type>::type>()..., 0};
  const int n = (int)sizeof...(A);
  for (int i = 0; i < n; ++i) {
    kinds[i] = k[i];
    sizes[i] = s[i];
    pointee_kinds[i] = pk[i];
    pointee_sizes[i] = ps[i];
  }
  return n;
}

struct EmuFunction {
  const char* name;
  void (*body)(void**);
  int (*signature)(char*, int*, char*, int*);
};

static char* emu_map_stack() {
  const long page = 4096;
  char* base = (char*)mmap(nullptr, EMU_STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  mprotect(base, page, PROT_NONE);  // a guard page: a stack overflow faults instead of corrupting
  return base + page;
}

// The order in which a round of the scheduler visits the threads: 0 forward, 1 reverse, else a
// shuffle seeded by the value.
static void emu_order(unsigned int* order, unsigned int n, unsigned long long schedule) {
  for (unsigned int k = 0; k < n; ++k) order[k] = schedule == 1 ? n - 1 - k : k;
  if (schedule > 1) {
    unsigned long long s = schedule;
    for (unsigned int k = n; k > 1; --k) {
      s = s * 6364136223846793005ULL + 1442695040888963407ULL;
      const unsigned int j = (unsigned int)((s >> 33) % k);
      const unsigned int tmp = order[k - 1];
      order[k - 1] = order[j];
      order[j] = tmp;
    }
  }
}

static void emu_run_block_fibers() {
  const unsigned int n = emu->nthreads;
  for (unsigned int k = 0; k < n; ++k) {
    EmuThread* t = &emu->threads[k];
    emu_set_state(t, EMU_READY);
    emu_fiber_init(t);
  }
  for (unsigned int w = 0; w < (n + EMU_WARP - 1) / EMU_WARP; ++w) {
    EmuWarp& warp = emu->warps[w];
    warp.arrived = 0;
    warp.live = (int)((w + 1) * EMU_WARP <= n ? EMU_WARP : n - w * EMU_WARP);
    for (int k = 0; k < EMU_WARP; ++k) warp.stamp[0][k] = warp.stamp[1][k] = -1;
  }
  emu->live = (int)n;
  emu->arrived = 0;
  // Run the first thread; threads hand over to each other, and control comes back here when every
  // thread has returned, or none is ready (a deadlock), or an error stopped the launch.
  EmuThread* first = &emu->threads[emu->order[0]];
  emu->cur = first;
  emu_switch(&emu->sched_sp, first->sp);
  if (emu->live > 0 && !emu->error) {
    int at_block = 0, at_warp = 0;
    for (unsigned int k = 0; k < n; ++k) {
      at_block += emu->threads[k].state == EMU_AT_BARRIER;
      at_warp += emu->threads[k].state == EMU_AT_WARP;
    }
    emu_fail("barrier deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d at a warp "
             "barrier (shuffle, vote or __syncwarp), %d have returned: the threads do not all reach "
             "the same barriers", emu->block_idx.x, emu->block_idx.y, emu->block_idx.z,
             at_block, at_warp, (int)n - emu->live);
  }
}

static sigjmp_buf emu_fault_jump;
static void* volatile emu_fault_address = nullptr;

static void emu_on_fault(int, siginfo_t* info, void*) {
  emu_fault_address = info->si_addr;
  siglongjmp(emu_fault_jump, 1);
}

// geometry: grid x, y, z, block x, y, z, dynamic shared bytes, mode (0 loop, 1 fibers), schedule.
static int emu_launch_impl(const EmuFunction* f, const long long* g, void** args, char* message, int length) {
  static EmuState* state = nullptr;
  if (state == nullptr) {
    state = (EmuState*)std::calloc(1, sizeof(EmuState));
    if (state == nullptr) { std::snprintf(message, length, "out of host memory"); return 1; }
  }
  emu = state;
  emu->grid = dim3{(unsigned int)g[0], (unsigned int)g[1], (unsigned int)g[2]};
  emu->block = dim3{(unsigned int)g[3], (unsigned int)g[4], (unsigned int)g[5]};
  emu->nthreads = (unsigned int)(g[3] * g[4] * g[5]);
  emu->mode = (int)g[7];
  emu->body = f->body;
  emu->args = args;
  emu->error = 0;
  emu->message[0] = 0;
  char* shared = nullptr;
  if (g[6] > 0) {
    shared = (char*)std::aligned_alloc(64, (size_t)((g[6] + 63) / 64 * 64));
    if (!shared) { std::snprintf(message, length, "out of host memory"); return 1; }
  }
  emu->dyn_shared = shared;
  emu->dyn_shared_size = (unsigned long long)g[6];
  static unsigned int order[EMU_MAX_THREADS];
  emu_order(order, emu->nthreads, (unsigned long long)g[8]);
  emu->order = order;
  for (unsigned int k = 0; k < emu->nthreads; ++k) emu->threads[order[k]].position = k;
  for (unsigned int k = 0; k < emu->nthreads; ++k) {
    EmuThread* t = &emu->threads[k];
    t->linear = k;
    t->idx = dim3{k % emu->block.x, (k / emu->block.x) % emu->block.y, k / (emu->block.x * emu->block.y)};
    if (emu->mode == 1 && emu->stacks[k] == nullptr) {
      emu->stacks[k] = emu_map_stack();
      if (!emu->stacks[k]) { std::snprintf(message, length, "cannot map a fiber stack"); std::free(shared); return 1; }
    }
    t->stack = emu->stacks[k];
  }
  // A fault (a device allocation's guard page, a fiber's stack guard, a wild pointer) jumps back here
  // and becomes the launch's error instead of killing the process.
  struct sigaction on_fault, old_segv, old_bus;
  std::memset(&on_fault, 0, sizeof(on_fault));
  on_fault.sa_sigaction = emu_on_fault;
  on_fault.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
  sigemptyset(&on_fault.sa_mask);
  sigaction(SIGSEGV, &on_fault, &old_segv);
  sigaction(SIGBUS, &on_fault, &old_bus);
  if (sigsetjmp(emu_fault_jump, 1) == 0) {
    for (unsigned int bz = 0; bz < emu->grid.z && !emu->error; ++bz)
      for (unsigned int by = 0; by < emu->grid.y && !emu->error; ++by)
        for (unsigned int bx = 0; bx < emu->grid.x && !emu->error; ++bx) {
          emu->block_idx = dim3{bx, by, bz};
          if (emu->mode == 0) {
            for (unsigned int k = 0; k < emu->nthreads && !emu->error; ++k) {
              emu->cur = &emu->threads[order[k]];
              f->body(args);
            }
          } else {
            emu_run_block_fibers();
          }
        }
  } else {
    emu->error = 0;
    emu_fail("invalid memory access at %p by thread (%u,%u,%u) of block (%u,%u,%u)", emu_fault_address,
             emu->cur->idx.x, emu->cur->idx.y, emu->cur->idx.z, emu->block_idx.x, emu->block_idx.y,
             emu->block_idx.z);
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  std::free(shared);
  emu->dyn_shared = nullptr;
  if (emu->error) {
    std::snprintf(message, length, "%s", emu->message);
    return 2;
  }
  return 0;
}

static void* emu_dynamic_shared() {
  static double none[8];
  if (emu->dyn_shared == nullptr) {
    emu_fail("the kernel uses extern __shared__ memory, but the launch gave shared_mem = 0");
    return none;
  }
  return emu->dyn_shared;
}

#define EMU_FUNCTION(fn)                                                                 \
  static void emu_body_##fn(void** emu_args_) { emu_call(&fn, emu_args_); }              \
  static int emu_sig_##fn(char* emu_k_, int* emu_s_, char* emu_pk_, int* emu_ps_) {      \
    return emu_signature(&fn, emu_k_, emu_s_, emu_pk_, emu_ps_);                         \
  }
#define EMU_ENTRY(fn) {#fn, &emu_body_##fn, &emu_sig_##fn}

#define EMU_TABLE(...)                                                                        \
  static const EmuFunction emu_functions[] = {__VA_ARGS__};                                   \
  EMU_EXPORT int emu_function_count() { return (int)(sizeof(emu_functions) / sizeof(emu_functions[0])); } \
  EMU_EXPORT const char* emu_function_name(int emu_i_) { return emu_functions[emu_i_].name; } \
  EMU_EXPORT int emu_function_signature(int emu_i_, char* emu_k_, int* emu_s_, char* emu_pk_, int* emu_ps_) { \
    return emu_functions[emu_i_].signature(emu_k_, emu_s_, emu_pk_, emu_ps_);                \
  }                                                                                           \
  EMU_EXPORT int emu_launch(int emu_i_, const long long* emu_g_, void** emu_args_, char* emu_msg_, int emu_len_) { \
    static std::mutex emu_lock_;                                                              \
    std::lock_guard<std::mutex> emu_hold_(emu_lock_);                                         \
    return emu_launch_impl(&emu_functions[emu_i_], emu_g_, emu_args_, emu_msg_, emu_len_);   \
  }
