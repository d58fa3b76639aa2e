// ParallelFor over XLA's intra-op thread pool, shared by the CPU kernels of dtm_jax.
#ifndef DTM_JAX_KERNELS_PARALLEL_FOR_H_
#define DTM_JAX_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>

#include "xla/ffi/api/ffi.h"

namespace dtm_jax {

// Shared by the calling thread and the pool tasks; pool tasks that start late find no item left and return.
struct Work {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mutex;
  std::condition_variable finished;
};

// Runs body(item, state) for every item in [0, items) on the calling thread and up to pool.num_threads() pool
// threads, each of which makes its own state with make_state() when it gets its first item. The calling thread
// works too, so the call completes even if the pool never runs these tasks.
template <typename MakeState, typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, MakeState make_state, Body body) {
  auto work = std::make_shared<Work>();
  auto run = [=]() {
    std::optional<decltype(make_state())> state;
    int64_t finished = 0;
    for (int64_t item; (item = work->next.fetch_add(1)) < items; ++finished) {
      if (!state) state.emplace(make_state());
      body(item, *state);
    }
    std::lock_guard<std::mutex> lock(work->mutex);
    work->done += finished;
    if (work->done == items) work->finished.notify_all();
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(std::function<void()>(run));
  run();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done == items; });
}

}  // namespace dtm_jax

#endif  // DTM_JAX_KERNELS_PARALLEL_FOR_H_
