// Durable file primitives and atomic checkpoint directories.
//
// A checkpoint is staged in <parent>/.<name>.tmp-<pid> and only renamed to <parent>/<name> once
// every byte is on disk, so a crash or Ctrl-C mid-save never leaves a half-written checkpoint
// under a name a later resume would trust. <parent>/latest names the newest committed one.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace lmtrain {

// Owns a POSIX file descriptor. The destructor closes silently (it cannot throw); writers call
// close() themselves so that a failed close — the last chance to learn of a lost write — throws.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd();

  int get() const { return fd_; }
  void sync(const std::string& path);   // fsync; throws "<path>: fsync failed: <errno text>"
  void close(const std::string& path);  // throws "<path>: close failed: <errno text>"

 private:
  int fd_ = -1;
};

// open(2) that throws "<path>: cannot open ...: <errno text>".
UniqueFd open_file(const std::string& path, int flags, mode_t mode = 0644);
// write(2) until everything is written (short writes and EINTR are retried).
void write_all(int fd, const void* data, size_t bytes, const std::string& path);
// pread(2) exactly `bytes` at `offset`; a short read means the file shrank under us and throws.
void pread_all(int fd, void* dst, size_t bytes, uint64_t offset, const std::string& path);
// fsync a file or directory by path (directories must be fsynced for renames to be durable).
void fsync_path(const std::string& path);

// Open (create/truncate), write everything, fsync, close; every error names the path and errno.
void write_file_synced(const std::string& path, std::string_view bytes);
// The whole file; errors name the path.
std::string read_file(const std::string& path);

class AtomicDir {
 public:
  // Creates <parent> if needed and an empty staging directory. `name` must be a plain
  // directory name (no '/', not hidden, not "latest").
  AtomicDir(std::string parent, std::string name);
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;
  // Removes the staging directory if commit() did not complete.
  ~AtomicDir();

  // The staging directory a process with `pid` uses for <parent>/<name>: other processes (the
  // other ranks of a job) write their files into it before the owner commits.
  static std::string staging_path(const std::string& parent, const std::string& name, long pid);

  // Where to write `file` while staging.
  std::string path(const std::string& file) const;
  const std::string& staging_dir() const { return staging_; }
  std::string final_dir() const;

  // fsync every staged file and the staging dir, rename it to <parent>/<name> (atomically
  // replacing an existing one), fsync <parent>, then optionally repoint <parent>/latest.
  void commit(bool update_latest = true);

 private:
  std::string parent_;
  std::string name_;
  std::string staging_;
  bool committed_ = false;
};

// rename(2), throwing "<from>: cannot rename to <to>: <errno text>".
void rename_or_fail(const std::string& from, const std::string& to);
// Removes `path` and everything below it; a failure is a warning, for clean-ups that must not
// fail what they follow.
void remove_all_or_warn(const std::string& path);

// The name in <parent>/latest, or nullopt if there is no pointer file yet. Throws if the pointer
// names a directory that does not exist: silently starting over would discard a run.
std::optional<std::string> read_latest(const std::string& parent);

// Removes the staging and set-aside directories that processes killed while saving left in
// <parent>; returns how many. Only while no other process saves there. Throws, removing nothing,
// when `latest` names a missing checkpoint, whose only copy may be among them.
int remove_unfinished(const std::string& parent);

}  // namespace lmtrain
