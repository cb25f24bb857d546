// Timing points of the CUDA backend: events recorded on the backend's stream, from a pool, so
// that profiling a step creates no events once the pool holds as many as a step uses.
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "cuda_check.cuh"

namespace lmtrain {

using cuda::cuda_check;

namespace {

struct DestroyEvent {
  void operator()(cudaEvent_t event) const { cudaEventDestroy(event); }
};
using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, DestroyEvent>;

}  // namespace

struct CudaBackend::EventPool {
  std::vector<Event> idle;
  size_t created = 0;
};

struct CudaBackend::PooledEvent final : TimingEvent::State {
  Event event;
  std::shared_ptr<EventPool> pool;
  bool recorded = false;
  PooledEvent(Event e, std::shared_ptr<EventPool> p) : event(std::move(e)), pool(std::move(p)) {}
  ~PooledEvent() override { pool->idle.push_back(std::move(event)); }
};

Backend::TimingEvent CudaBackend::make_timing_event() {
  if (!event_pool_) event_pool_ = std::make_shared<EventPool>();
  Event event;
  if (event_pool_->idle.empty()) {
    cudaEvent_t created = nullptr;
    // Timing enabled (no cudaEventDisableTiming); no blocking sync: elapsed_ms runs after one.
    cuda_check(cudaEventCreateWithFlags(&created, cudaEventDefault), "cudaEventCreate (timing)");
    event.reset(created);
    // Room for every event in the idle list: returning one (in a destructor) never allocates.
    event_pool_->idle.reserve(++event_pool_->created);
  } else {
    event = std::move(event_pool_->idle.back());
    event_pool_->idle.pop_back();
  }
  return TimingEvent(std::make_unique<PooledEvent>(std::move(event), event_pool_));
}

namespace {

// The event's state, checked to come from `pool` (this backend).
template <class Pooled, class Pool>
Pooled& pooled(const Backend::TimingEvent& event, const Pool& pool, const char* op) {
  auto* state = dynamic_cast<Pooled*>(event.state());
  check(state != nullptr && state->pool == pool, "{}: not a timing event of this cuda backend", op);
  return *state;
}

}  // namespace

void CudaBackend::record_timing_event(TimingEvent& event) {
  PooledEvent& e = pooled<PooledEvent>(event, event_pool_, "record_timing_event");
  cuda_check(cudaEventRecord(e.event.get(), stream_.get()), "cudaEventRecord (timing)");
  e.recorded = true;
}

double CudaBackend::elapsed_ms(const TimingEvent& start, const TimingEvent& end) {
  const PooledEvent& a = pooled<PooledEvent>(start, event_pool_, "elapsed_ms");
  const PooledEvent& b = pooled<PooledEvent>(end, event_pool_, "elapsed_ms");
  check(a.recorded && b.recorded, "elapsed_ms: a timing event was never recorded");
  float ms = 0;
  cuda_check(cudaEventElapsedTime(&ms, a.event.get(), b.event.get()), "cudaEventElapsedTime");
  return ms;
}

size_t CudaBackend::timing_events_created() const { return event_pool_ ? event_pool_->created : 0; }

}  // namespace lmtrain
