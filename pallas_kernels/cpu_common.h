// Helpers shared by the native CPU kernels (cpu_*.cc, built into one library by pallas_kernels/cpu_build.py):
// bf16 widening and work splitting over XLA's intra-op thread pool.

#ifndef K2JAX_PALLAS_KERNELS_CPU_COMMON_H_
#define K2JAX_PALLAS_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace k2jax_cpu {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// How long the caller spins for its helpers' last chunks before it sleeps: on a VM, waking a sleeping thread costs a
// futex call and an interrupt to its idle virtual CPU, tens of microseconds, more than such a chunk takes.
constexpr std::chrono::microseconds kSpinWait{50};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Runs fn(u0, u1) over [0, units) in chunks claimed by this thread and helpers on XLA's intra-op pool.
// The caller works too and waits only for chunks already claimed, never for a helper to start: pool threads
// may all be busy (another custom call running in parallel), and late helpers find nothing left and exit.
template <typename F>
void parallel_units(xla::ffi::ThreadPool& pool, int64_t units, F fn) {
  int64_t helpers = std::min<int64_t>(units, std::max<int64_t>(pool.num_threads(), 1)) - 1;
  if (helpers <= 0) {
    fn(0, units);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, finished{0};
    int64_t chunks, units;
    const F* fn;
    std::mutex mu;
    std::condition_variable done;
    void work() {  // claims chunks until none are left; fn is touched only for a claimed chunk
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        (*fn)(units * c / chunks, units * (c + 1) / chunks);
        if (finished.fetch_add(1) + 1 == chunks) {
          std::lock_guard<std::mutex> lock(mu);
          done.notify_all();
        }
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->chunks = std::min<int64_t>(units, 4 * (helpers + 1));
  shared->units = units;
  shared->fn = &fn;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->work(); });
  shared->work();
  for (auto until = std::chrono::steady_clock::now() + kSpinWait;;) {  // a helper's last chunk is short
    for (int i = 0; i < 64; ++i, cpu_relax())
      if (shared->finished.load(std::memory_order_acquire) == shared->chunks) return;
    if (std::chrono::steady_clock::now() > until) break;
  }
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->done.wait(lock, [&] { return shared->finished.load() == shared->chunks; });
}

}  // namespace k2jax_cpu

#endif  // K2JAX_PALLAS_KERNELS_CPU_COMMON_H_
