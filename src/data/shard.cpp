#include "data/shard.h"

#include <fcntl.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/atomic_dir.h"
#include "io/json_reason.h"

namespace lmtrain {

static_assert(std::endian::native == std::endian::little,
              "shards are little endian, read in place");

namespace {

constexpr size_t kHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// Ids must be below the vocabulary; without one they must still fit int32: a uint32 id above
// INT32_MAX would turn negative, and no vocabulary is that large.
uint32_t id_limit(int32_t vocab) { return vocab > 0 ? uint32_t(vocab) : uint32_t(INT32_MAX) + 1; }

// The largest of n ids: a max-reduction the compiler vectorizes, split over the OpenMP threads.
template <typename Id>
Id max_id(const Id* ids, size_t n) {
  Id largest = 0;
#pragma omp parallel for simd reduction(max : largest)
  for (size_t i = 0; i < n; ++i) largest = ids[i] > largest ? ids[i] : largest;
  return largest;
}

// Closes a file descriptor on scope exit; the mapping outlives it.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

TokenShard::TokenShard(std::string path) : path_(std::move(path)) {
  Fd file{::open(path_.c_str(), O_RDONLY)};
  check(file.fd >= 0, "{}: cannot open shard: {}", path_, std::strerror(errno));
  struct stat st {};
  const bool stat_ok = ::fstat(file.fd, &st) == 0;  // before errno is read, in its own statement
  check(stat_ok, "{}: cannot stat shard: {}", path_, std::strerror(errno));
  const auto bytes = static_cast<size_t>(st.st_size);
  check(bytes >= kHeaderBytes, "{}: not a token shard: {} bytes is shorter than the {}-byte header",
        path_, bytes, kHeaderBytes);

  void* map = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, file.fd, 0);
  check(map != MAP_FAILED, "{}: cannot mmap shard: {}", path_, std::strerror(errno));
  map_ = std::unique_ptr<void, Unmap>(map, Unmap{bytes});
  std::array<int32_t, 3> header{};
  std::memcpy(header.data(), map, sizeof(header));
  const auto [magic, version, count] = header;

  auto reject = [&](const std::string& message) {
    throw Error(fmt::format("{}: {}", path_, message));
  };
  if (magic != kShardMagic)
    reject(fmt::format("not a token shard: magic {}, expected {}", magic, kShardMagic));
  if (version != 1 && version != 2)
    reject(fmt::format("unknown shard version {}, expected 1 (uint16 tokens) or 2 (uint32 tokens)",
                       version));
  if (count < 0) reject(fmt::format("corrupt shard: negative token count {}", count));
  const size_t width = version == 1 ? 2 : 4;
  const size_t expected = static_cast<size_t>(count) * width;
  const size_t held = bytes - kHeaderBytes;
  if (held != expected)
    reject(fmt::format(
        "{} shard: header says {} tokens ({} bytes) but file holds {} bytes after the header",
        held < expected ? "truncated" : "oversized", count, expected, held));
  version_ = version;
  count_ = static_cast<size_t>(count);
  tokens_ = static_cast<const char*>(map) + kHeaderBytes;
}

void TokenShard::Unmap::operator()(void* p) const { ::munmap(p, bytes); }

void TokenShard::copy(size_t begin, std::span<int32_t> out, int32_t vocab) const {
  check(begin + out.size() <= count_, "{}: reading tokens [{}, {}) past the end ({} tokens)", path_,
        begin, begin + out.size(), count_);
  const uint32_t limit = id_limit(vocab);
  for (size_t i = 0; i < out.size(); ++i) {
    const uint32_t t = token(begin + i);
    if (t >= limit) reject_id(begin + i, t, vocab);
    out[i] = static_cast<int32_t>(t);
  }
}

bool TokenShard::check_ids(int32_t vocab, size_t begin, size_t end) const {
  const uint32_t limit = id_limit(vocab);
  if (version_ == 1 && limit > UINT16_MAX) return false;
  end = std::min(end, count_);
  if (begin >= end) return true;
  const size_t n = end - begin;
  const uint32_t largest = version_ == 1 ? max_id(static_cast<const uint16_t*>(tokens_) + begin, n)
                                         : max_id(static_cast<const uint32_t*>(tokens_) + begin, n);
  if (largest >= limit) {  // a second pass finds the first such id, to name its position
    for (size_t i = begin; i < end; ++i)
      if (token(i) >= limit) reject_id(i, token(i), vocab);
  }
  return true;
}

void TokenShard::reject_id(size_t position, uint32_t id, int32_t vocab) const {
  fail("{}: token {} has id {}, outside the {}", path_, position, id,
       vocab > 0 ? fmt::format("model's vocabulary of {}", vocab) : "range of int32");
}

void write_shard(const std::string& path, std::span<const uint32_t> tokens) {
  check(tokens.size() <= static_cast<size_t>(INT32_MAX), "{}: {} tokens do not fit one shard", path,
        tokens.size());
  const bool narrow =
      std::all_of(tokens.begin(), tokens.end(), [](uint32_t t) { return t <= UINT16_MAX; });
  std::array<int32_t, kShardHeaderInts> header{};
  header[0] = kShardMagic;
  header[1] = narrow ? 1 : 2;
  header[2] = static_cast<int32_t>(tokens.size());

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  check(out.good(), "{}: cannot create shard", path);
  out.write(reinterpret_cast<const char*>(header.data()), sizeof(header));
  if (narrow) {
    std::vector<uint16_t> small(tokens.begin(), tokens.end());
    out.write(reinterpret_cast<const char*>(small.data()),
              static_cast<std::streamsize>(small.size() * 2));
  } else {
    out.write(reinterpret_cast<const char*>(tokens.data()),
              static_cast<std::streamsize>(tokens.size_bytes()));
  }
  check(out.good(), "{}: write failed", path);
}

namespace {

// prepare_data.py's meta.json beside the shards lists every file it wrote (with its sha256). A
// shard of this selection that it lists and that is gone (an incomplete copy) is an error, not
// a run that quietly trains on less data. A meta.json that is malformed is check_shard_meta's
// to name; one without the list (or no meta.json: llm.c's shards) checks nothing.
void check_listed_shards_present(const std::filesystem::path& dir, const std::string& prefix,
                                 const std::vector<std::string>& found) {
  namespace fs = std::filesystem;
  const fs::path path = dir / "meta.json";
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return;
  const auto meta = nlohmann::json::parse(read_file(path.string()), nullptr, false);
  if (!meta.is_object() || !meta.contains("sha256") || !meta["sha256"].is_object()) return;
  std::set<std::string> names;
  for (const auto& file : found) names.insert(fs::path(file).filename().string());
  std::vector<std::string> missing;
  for (const auto& [name, hash] : meta["sha256"].items()) {
    if (name.starts_with(prefix) && name.ends_with(".bin") && !names.contains(name))
      missing.push_back(name);
  }
  if (missing.empty()) return;
  const size_t shown = std::min<size_t>(missing.size(), 3);
  fail(
      "{}: {} shard{} that {} lists {} missing ({}{}); an incomplete copy? Copy them, or "
      "remove their names from its \"sha256\" to use the shards that are there",
      dir.string(), missing.size(), missing.size() > 1 ? "s" : "", path.string(),
      missing.size() > 1 ? "are" : "is",
      fmt::format("{}", fmt::join(missing.begin(), missing.begin() + long(shown), ", ")),
      missing.size() > shown ? ", ..." : "");
}

}  // namespace

std::vector<std::string> list_shards(const std::string& path_or_dir, const std::string& split) {
  namespace fs = std::filesystem;
  const fs::path path(path_or_dir);
  if (fs::is_regular_file(path)) {
    TokenShard{path.string()};  // validates the header, as below
    return {path.string()};
  }

  // A directory selects <split>_*.bin inside it; anything else is a prefix of file names.
  const bool is_dir = fs::is_directory(path);
  const fs::path dir =
      is_dir ? path : (path.has_parent_path() ? path.parent_path() : fs::path("."));
  const std::string prefix = is_dir ? split + "_" : path.filename().string();
  std::vector<std::string> found;
  if (fs::is_directory(dir)) {
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      // Not only regular files: a dangling link of a shard's name is reported as that shard.
      if (!entry.is_directory() && name.starts_with(prefix) && name.ends_with(".bin"))
        found.push_back(entry.path().string());
    }
  }
  std::sort(found.begin(), found.end());
  if (found.empty()) {
    if (is_dir) fail("{}: no {}_*.bin shards in this directory", path_or_dir, split);
    fail("{}: no such shard file, directory or shard prefix", path_or_dir);
  }
  check_listed_shards_present(dir, prefix, found);
  // Opening checks each header against its file size, so a damaged shard is reported now rather
  // than when it is first read (validation shards: after the whole training run).
  for (const auto& file : found) TokenShard{file};
  return found;
}

IdCheck check_shard_ids(const std::vector<std::string>& shards, int32_t vocab, int rank,
                        int world) {
  std::vector<TokenShard> opened(shards.begin(), shards.end());
  uint64_t total = 0;
  for (const TokenShard& shard : opened) total += shard.size();
  // This rank's tokens of the shards laid end to end.
  const uint64_t begin = total * uint64_t(rank) / uint64_t(world);
  const uint64_t end = total * uint64_t(rank + 1) / uint64_t(world);
  IdCheck done;
  uint64_t offset = 0;  // where the shard starts in that order
  for (const TokenShard& shard : opened) {
    const uint64_t lo = std::max(begin, offset), hi = std::min(end, offset + shard.size());
    if (lo < hi) {
      if (shard.check_ids(vocab, lo - offset, hi - offset)) {
        ++done.shards;
        done.tokens += hi - lo;
      } else {
        ++done.skipped;
      }
    }
    offset += shard.size();
  }
  return done;
}

void check_shard_meta(const std::string& shard, const std::string& tokenizer_path, int vocab_size,
                      int32_t bos_id) {
  namespace fs = std::filesystem;
  const std::string path = (fs::path(shard).parent_path() / "meta.json").string();
  // Not following links: one that leads nowhere is reported by reading it.
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(path, ec))) return;
  const auto meta = parse_json(read_file(path), path);
  check(meta.is_object(), "{}: not a JSON object, expected scripts/prepare_data.py's meta.json",
        path);
  auto integer = [&](const char* key) {
    const auto it = meta.find(key);
    check(it != meta.end() && it->is_number_integer(),
          "{}: expected an integer '{}' (as scripts/prepare_data.py writes), got {}", path, key,
          it == meta.end() ? "none" : it->dump());
    return it->get<int64_t>();
  };
  const int64_t meta_vocab = integer("vocab_size"), meta_bos = integer("bos_id");
  check(meta_vocab == vocab_size && meta_bos == bos_id,
        "{}: the shards beside it were made with vocab_size {} and bos_id {}, but the tokenizer {} "
        "has vocab_size {} and bos_id {}",
        path, meta_vocab, meta_bos, tokenizer_path, vocab_size, bos_id);
  // prepare_data.py saves the tokenizer it used beside them too: one of the same size and BOS
  // with other merges would still make other ids. Compared as JSON, so formatting may differ.
  const fs::path beside = fs::path(path).parent_path() / "tokenizer.json";
  if (!fs::exists(fs::symlink_status(beside, ec)) || fs::equivalent(beside, tokenizer_path, ec))
    return;
  auto parse = [](const std::string& file) { return parse_json(read_file(file), file); };
  check(parse(beside.string()) == parse(tokenizer_path),
        "{}: the tokenizer the shards beside it were made with differs from the tokenizer {} "
        "(the same vocab_size and bos_id, other contents)",
        beside.string(), tokenizer_path);
}

}  // namespace lmtrain
