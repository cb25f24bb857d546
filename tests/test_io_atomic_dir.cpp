#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <set>
#include <string>

#include "core/error.h"
#include "io/atomic_dir.h"
#include "test_support.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using lmtrain::AtomicDir;
using lmtrain::read_file;
using lmtrain::read_latest;
using lmtrain::write_file_synced;
using lmtrain::test_support::TempDir;

namespace {

std::set<std::string> entries(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

void commit_checkpoint(const std::string& parent, const std::string& name,
                       const std::string& content, bool update_latest = true) {
  AtomicDir dir(parent, name);
  write_file_synced(dir.path("weights.bin"), content);
  dir.commit(update_latest);
}

}  // namespace

TEST_CASE("AtomicDir commit creates the directory and the latest pointer", "[io]") {
  TempDir tmp;
  const std::string parent = tmp / "ckpt";  // created on demand
  commit_checkpoint(parent, "step-10", "hello");
  CHECK(entries(parent) == std::set<std::string>{"step-10", "latest"});
  CHECK(read_file(parent + "/step-10/weights.bin") == "hello");
  CHECK(read_file(parent + "/latest") == "step-10\n");
  CHECK(read_latest(parent) == "step-10");
}

TEST_CASE("AtomicDir destroyed without commit leaves no trace", "[io]") {
  TempDir tmp;
  try {
    AtomicDir dir(tmp.path().string(), "step-1");
    write_file_synced(dir.path("weights.bin"), "partial");
    CHECK(fs::exists(dir.staging_dir()));
    throw std::runtime_error("interrupted save");
  } catch (const std::runtime_error&) {
  }
  CHECK(entries(tmp.path().string()).empty());
  CHECK(read_latest(tmp.path().string()) == std::nullopt);
}

TEST_CASE("AtomicDir re-committing a name replaces the old directory", "[io]") {
  TempDir tmp;
  {
    AtomicDir dir(tmp.path().string(), "step-5");
    write_file_synced(dir.path("weights.bin"), "old");
    write_file_synced(dir.path("only-in-old.txt"), "x");
    dir.commit();
  }
  commit_checkpoint(tmp.path().string(), "step-5", "new");
  CHECK(entries(tmp.path().string()) ==
        std::set<std::string>{"step-5", "latest"});  // nothing set aside
  CHECK(entries(tmp / "step-5") == std::set<std::string>{"weights.bin"});
  CHECK(read_file(tmp / "step-5/weights.bin") == "new");
}

TEST_CASE("AtomicDir latest points at the newest commit", "[io]") {
  TempDir tmp;
  commit_checkpoint(tmp.path().string(), "step-1", "a");
  commit_checkpoint(tmp.path().string(), "step-2", "b");
  CHECK(read_latest(tmp.path().string()) == "step-2");
  commit_checkpoint(tmp.path().string(), "best", "c", /*update_latest=*/false);
  CHECK(read_latest(tmp.path().string()) == "step-2");
  CHECK(entries(tmp.path().string()) ==
        std::set<std::string>{"step-1", "step-2", "best", "latest"});
}

TEST_CASE("AtomicDir rejects unsafe names and double commits", "[io]") {
  TempDir tmp;
  for (const char* name : {"", "a/b", ".hidden", "latest", ".."})
    CHECK_THROWS_AS(AtomicDir(tmp.path().string(), name), lmtrain::Error);
  AtomicDir dir(tmp.path().string(), "step-1");
  dir.commit();
  CHECK_THROWS_WITH(dir.commit(), Contains("already committed"));
}

TEST_CASE("Stale staging directories of a crashed process do not confuse read_latest", "[io]") {
  TempDir tmp;
  // What a process killed mid-save leaves behind: a hidden staging dir, maybe a latest.tmp.
  fs::create_directories(tmp / ".step-2.tmp-999999");
  write_file_synced(tmp / ".step-2.tmp-999999/weights.bin", "half");
  CHECK(read_latest(tmp.path().string()) == std::nullopt);
  commit_checkpoint(tmp.path().string(), "step-1", "a");
  write_file_synced(tmp / "latest.tmp", "step-2\n");
  CHECK(read_latest(tmp.path().string()) == "step-1");
}

TEST_CASE("File helpers and read_latest errors name the path", "[io]") {
  TempDir tmp;
  const std::string missing = tmp / "nope/file.bin";
  CHECK_THROWS_WITH(read_file(missing), Contains(missing) && Contains("No such file"));
  CHECK_THROWS_WITH(write_file_synced(missing, "x"), Contains(missing));

  write_file_synced(tmp / "latest", "step-9\n");
  CHECK_THROWS_WITH(read_latest(tmp.path().string()), Contains(tmp / "latest") &&
                                                          Contains("'step-9'") &&
                                                          Contains("not a directory"));
  write_file_synced(tmp / "latest", "../etc\n");
  CHECK_THROWS_WITH(read_latest(tmp.path().string()),
                    Contains(tmp / "latest") && Contains("\"../etc\""));
}

// `latest` is one name: spaces around it are trimmed; two lines, control characters, a large
// file or something that is not a file are one-line errors (the name shown escaped).
TEST_CASE("read_latest takes one name and nothing else", "[io]") {
  TempDir tmp;
  const std::string parent = tmp.path().string(), latest = tmp / "latest";
  fs::create_directory(tmp / "step-1");
  write_file_synced(latest, "  step-1 \n");
  CHECK(read_latest(parent) == "step-1");
  write_file_synced(latest, "step-1\nstep-2\n");
  CHECK_THROWS_WITH(read_latest(parent), Contains("\"step-1\\nstep-2\""));
  write_file_synced(latest, std::string("step-1\0junk", 11));
  CHECK_THROWS_WITH(read_latest(parent), Contains("\"step-1\\u{0}junk\"") || Contains("\\x00"));
  write_file_synced(latest, std::string(5000, 'a'));
  CHECK_THROWS_WITH(read_latest(parent), Contains("a file of 5000 bytes"));
  fs::remove(latest);
  fs::create_directory(latest);
  CHECK_THROWS_WITH(read_latest(parent), Contains("expected a file holding"));
  fs::remove(latest);
  REQUIRE(::mkfifo(latest.c_str(), 0644) == 0);  // reading it would block
  CHECK_THROWS_WITH(read_latest(parent), Contains("expected a file holding"));
  fs::remove(latest);
  fs::create_symlink(latest, latest);  // a loop of links
  CHECK_THROWS_WITH(read_latest(parent), Contains("expected a file holding"));
}

// What processes killed while saving leave: staging and set-aside directories go, unless the
// checkpoint `latest` names is missing (they may hold its only copy).
TEST_CASE("remove_unfinished clears what killed saves left", "[io]") {
  TempDir tmp;
  const std::string parent = tmp.path().string();
  CHECK(lmtrain::remove_unfinished(tmp / "none") == 0);
  commit_checkpoint(parent, "step-1", "one");
  for (const char* dir : {".step-2.tmp-123", ".step-1.old-77", ".step-1.tmp-8", ".keep", "x.tmp-1"})
    fs::create_directory(tmp / dir);
  CHECK(lmtrain::remove_unfinished(parent) == 3);
  CHECK(entries(parent) == std::set<std::string>{"step-1", "latest", ".keep", "x.tmp-1"});

  fs::rename(tmp / "step-1", tmp / ".step-1.old-77");
  fs::create_directory(tmp / ".step-1.tmp-8");
  CHECK_THROWS_WITH(lmtrain::remove_unfinished(parent), Contains("not a directory"));
  CHECK(entries(parent) ==
        std::set<std::string>{".step-1.old-77", ".step-1.tmp-8", "latest", ".keep", "x.tmp-1"});
}
