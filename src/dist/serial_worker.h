// A thread that runs submitted jobs one at a time in submission order: the communication
// thread of the Gloo communicator, so that collectives progress while the caller computes and
// every rank still runs them in the order they were started.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

namespace lmtrain::dist {

class SerialWorker {
 public:
  SerialWorker();
  // Runs what is queued, then joins.
  ~SerialWorker();
  SerialWorker(const SerialWorker&) = delete;
  SerialWorker& operator=(const SerialWorker&) = delete;

  // The future becomes ready when the job has run, holding the exception it threw, if any.
  std::future<void> submit(std::function<void()> job);

 private:
  void run();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::packaged_task<void()>> jobs_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts after the members it uses exist
};

}  // namespace lmtrain::dist
