#include "io/atomic_dir.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc >= 2.28)
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace fs = std::filesystem;

namespace lmtrain {
namespace {

// Call immediately after the failing syscall, before anything else can clobber errno.
std::string errno_text() { return std::system_category().message(errno); }

bool is_plain_name(const std::string& name) {
  return !name.empty() && name.size() <= 255 && name.front() != '.' && name != "latest" &&
         std::none_of(name.begin(), name.end(), [](unsigned char c) {
           return c == '/' || c < 0x20 || c == 0x7f;  // no path, no control characters
         });
}

// <name> of a staging ".<name>.tmp-<pid>" or set-aside ".<name>.old-<pid>" directory; empty for
// anything else.
std::string unfinished_name(const std::string& file) {
  for (const char* mark : {".tmp-", ".old-"}) {
    const size_t at = file.rfind(mark);
    if (file.front() != '.' || at == std::string::npos || at < 2) continue;
    const std::string pid = file.substr(at + 5);
    if (!pid.empty() &&
        std::all_of(pid.begin(), pid.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return file.substr(1, at - 1);
  }
  return {};
}

// fsync every file and directory below `dir`, then `dir` itself, so the rename that publishes it
// cannot become durable before its contents.
void sync_tree(const std::string& dir) {
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    if (it->is_regular_file() || it->is_directory()) fsync_path(it->path().string());
  }
  check(!ec, "{}: cannot list staged files: {}", dir, ec.message());
  fsync_path(dir);
}

}  // namespace

void rename_or_fail(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    fail("{}: cannot rename to {}: {}", from, to, errno_text());
}

void remove_all_or_warn(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) spdlog::warn("{}: could not remove: {}", path, ec.message());
}

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

void UniqueFd::sync(const std::string& path) {
  if (::fsync(fd_) != 0) fail("{}: fsync failed: {}", path, errno_text());
}

void UniqueFd::close(const std::string& path) {
  // POSIX leaves the fd state unspecified after a failed close; on Linux it is always released,
  // so it must not be closed again.
  int rc = ::close(std::exchange(fd_, -1));
  if (rc != 0) fail("{}: close failed: {}", path, errno_text());
}

UniqueFd open_file(const std::string& path, int flags, mode_t mode) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) fail("{}: cannot open: {}", path, errno_text());
  return UniqueFd(fd);
}

void write_all(int fd, const void* data, size_t bytes, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::write(fd, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("{}: write failed: {}", path, errno_text());
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

void pread_all(int fd, void* dst, size_t bytes, uint64_t offset, const std::string& path) {
  auto* p = static_cast<char*>(dst);
  while (bytes > 0) {
    ssize_t n = ::pread(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("{}: read at byte {} failed: {}", path, offset, errno_text());
    check(n > 0, "{}: truncated: expected {} more bytes at byte {}", path, bytes, offset);
    p += n;
    offset += static_cast<uint64_t>(n);
    bytes -= static_cast<size_t>(n);
  }
}

void fsync_path(const std::string& path) { open_file(path, O_RDONLY).sync(path); }

void write_file_synced(const std::string& path, std::string_view bytes) {
  UniqueFd fd = open_file(path, O_WRONLY | O_CREAT | O_TRUNC);
  write_all(fd.get(), bytes.data(), bytes.size(), path);
  fd.sync(path);
  fd.close(path);
}

std::string read_file(const std::string& path) {
  UniqueFd fd = open_file(path, O_RDONLY);
  std::string out;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("{}: read failed: {}", path, errno_text());
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

AtomicDir::AtomicDir(std::string parent, std::string name)
    : parent_(std::move(parent)), name_(std::move(name)) {
  check(is_plain_name(name_), "{}: checkpoint name '{}' must be a plain, non-hidden directory name",
        parent_, name_);
  std::error_code ec;
  fs::create_directories(parent_, ec);
  check(!ec, "{}: cannot create directory: {}", parent_, ec.message());
  staging_ = staging_path(parent_, name_, ::getpid());
  // A leftover with our pid is from an earlier AtomicDir in this process or a recycled pid of a
  // crashed one; either way nothing can still be writing to it.
  fs::remove_all(staging_, ec);
  check(!ec, "{}: cannot remove stale staging directory: {}", staging_, ec.message());
  fs::create_directory(staging_, ec);
  check(!ec, "{}: cannot create staging directory: {}", staging_, ec.message());
}

AtomicDir::~AtomicDir() {
  if (!committed_) remove_all_or_warn(staging_);
}

std::string AtomicDir::staging_path(const std::string& parent, const std::string& name, long pid) {
  return fmt::format("{}/.{}.tmp-{}", parent, name, pid);
}

std::string AtomicDir::path(const std::string& file) const { return staging_ + "/" + file; }

std::string AtomicDir::final_dir() const { return parent_ + "/" + name_; }

void AtomicDir::commit(bool update_latest) {
  check(!committed_, "{}: already committed", final_dir());
  sync_tree(staging_);
  const std::string target = final_dir();
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(target, ec))) {
    rename_or_fail(staging_, target);
    committed_ = true;
  } else if (::renameat2(AT_FDCWD, staging_.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) ==
             0) {
    // Swapped in one atomic step: the target is never missing; the old checkpoint now sits in
    // the staging path and is deleted once the swap is durable.
    committed_ = true;
    fsync_path(parent_);
    remove_all_or_warn(staging_);
  } else if (errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
    // Filesystem without RENAME_EXCHANGE: move the old one aside first. A crash between the two
    // renames leaves the target missing but both copies intact on disk.
    const std::string aside = fmt::format("{}/.{}.old-{}", parent_, name_, ::getpid());
    remove_all_or_warn(aside);
    rename_or_fail(target, aside);
    rename_or_fail(staging_, target);
    committed_ = true;
    fsync_path(parent_);
    remove_all_or_warn(aside);
  } else {
    fail("{}: cannot replace with {}: {}", target, staging_, errno_text());
  }
  fsync_path(parent_);
  if (!update_latest) return;
  const std::string latest = parent_ + "/latest";
  write_file_synced(latest + ".tmp", name_ + "\n");
  rename_or_fail(latest + ".tmp", latest);
  fsync_path(parent_);
}

std::optional<std::string> read_latest(const std::string& parent) {
  const std::string latest = parent + "/latest";
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(latest, ec))) return std::nullopt;
  // Not a FIFO or a device to block on, a link that leads nowhere or in a loop, nor a file too
  // large to be a name.
  check(fs::is_regular_file(fs::status(latest, ec)),
        "{}: expected a file holding a checkpoint directory name", latest);
  const uintmax_t size = fs::file_size(latest, ec);
  check(!ec && size <= 4096, "{}: expected a checkpoint directory name, got a file of {} bytes",
        latest, size);
  std::string name = read_file(latest);
  auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!name.empty() && space(name.back())) name.pop_back();
  name.erase(name.begin(), std::find_if_not(name.begin(), name.end(), space));
  check(is_plain_name(name), "{}: expected a checkpoint directory name, got {:?}", latest, name);
  check(fs::is_directory(parent + "/" + name, ec),
        "{}: points at '{}' but {}/{} is not a directory", latest, name, parent, name);
  return name;
}

int remove_unfinished(const std::string& parent) {
  std::error_code ec;
  if (!fs::is_directory(parent, ec)) return 0;
  // Throws when `latest` names a missing checkpoint: a crash between the two renames of a
  // replacing commit leaves that checkpoint only in the directories removed below.
  read_latest(parent);
  int removed = 0;
  for (const auto& entry : fs::directory_iterator(parent)) {
    if (unfinished_name(entry.path().filename().string()).empty()) continue;
    remove_all_or_warn(entry.path().string());
    ++removed;
  }
  return removed;
}

}  // namespace lmtrain
