// Timing points of the CPU backend. Its ops run to completion before they return, so the host
// clock at record time is the position in the work queue.
#include <chrono>

#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

namespace {

using Clock = std::chrono::steady_clock;

struct HostTime final : Backend::TimingEvent::State {
  Clock::time_point at{};
  bool recorded = false;
};

HostTime& host_time(const Backend::TimingEvent& event, const char* op) {
  auto* time = dynamic_cast<HostTime*>(event.state());
  check(time != nullptr, "{}: not a timing event of the cpu backend", op);
  return *time;
}

}  // namespace

Backend::TimingEvent CpuBackend::make_timing_event() {
  return TimingEvent(std::make_unique<HostTime>());
}

void CpuBackend::record_timing_event(TimingEvent& event) {
  HostTime& time = host_time(event, "record_timing_event");
  time.at = Clock::now();
  time.recorded = true;
}

double CpuBackend::elapsed_ms(const TimingEvent& start, const TimingEvent& end) {
  const HostTime &a = host_time(start, "elapsed_ms"), &b = host_time(end, "elapsed_ms");
  check(a.recorded && b.recorded, "elapsed_ms: a timing event was never recorded");
  return std::chrono::duration<double, std::milli>(b.at - a.at).count();
}

}  // namespace lmtrain
