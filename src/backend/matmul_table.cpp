#include "backend/matmul_table.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <tuple>

#include "config/config.h"
#include "core/error.h"
#include "io/atomic_dir.h"

namespace lmtrain {

namespace {

namespace fs = std::filesystem;

// A table file as written: the schema's reader gives unknown-key and type errors naming the key.
struct Row {
  int64_t m = 0, n = 0, k = 0, batch = 0, ld_a = 0, ld_b = 0, ld_out = 0;
  bool trans_a = false, trans_b = false;
  std::string in, out, compute;
  int align_a = 0, align_b = 0, align_out = 0;
  std::vector<std::string> algo;
  double ms = 0, heuristic_ms = 0;
  template <class V>
  void visit(V& v) {
    v("m", m, "");
    v("n", n, "");
    v("k", k, "");
    v("batch", batch, "");
    v("ld_a", ld_a, "");
    v("ld_b", ld_b, "");
    v("ld_out", ld_out, "");
    v("trans_a", trans_a, "");
    v("trans_b", trans_b, "");
    v("in", in, "");
    v("out", out, "");
    v("compute", compute, "");
    v("align_a", align_a, "");
    v("align_b", align_b, "");
    v("align_out", align_out, "");
    v("algo", algo, "");
    v("ms", ms, "");
    v("heuristic_ms", heuristic_ms, "");
  }
};

struct File {
  std::string device;
  int sm_count = 0;
  uint64_t cublaslt_version = 0;
  std::vector<Row> matmuls;
  template <class V>
  void visit(V& v) {
    v("device", device, "");
    v("sm_count", sm_count, "");
    v("cublaslt_version", cublaslt_version, "");
    v("matmuls", matmuls, "");
  }
};

constexpr const char* kCompute32F = "32F";
constexpr const char* kComputeTf32 = "32F_FAST_TF32";

DType parse_dtype(const std::string& name, const std::string& where) {
  if (name == "bf16") return DType::bf16;
  if (name == "f32") return DType::f32;
  fail("{}: expected \"bf16\" or \"f32\", got \"{}\"", where, name);
}

std::string hex(uint64_t v) { return fmt::format("{:016x}", v); }

uint64_t parse_hex(const std::string& text, const std::string& where) {
  const bool ok = text.size() == 16 && std::all_of(text.begin(), text.end(), [](char c) {
                    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                  });
  check(ok, "{}: expected 16 lowercase hex digits, got \"{}\"", where, text);
  return std::stoull(text, nullptr, 16);
}

bool power_of_two_up_to_256(int v) { return v >= 1 && v <= 256 && (v & (v - 1)) == 0; }

MatmulShape to_shape(const Row& r, const std::string& where) {
  MatmulShape s;
  s.m = r.m, s.n = r.n, s.k = r.k, s.batch = r.batch;
  s.ld_a = r.ld_a, s.ld_b = r.ld_b, s.ld_out = r.ld_out;
  s.trans_a = r.trans_a, s.trans_b = r.trans_b;
  for (auto [value, key] : {std::pair{s.m, "m"},
                            {s.n, "n"},
                            {s.k, "k"},
                            {s.batch, "batch"},
                            {s.ld_a, "ld_a"},
                            {s.ld_b, "ld_b"},
                            {s.ld_out, "ld_out"}})
    check(value >= 1, "{}.{}: expected an integer >= 1, got {}", where, key, value);
  // A rank-2 operand's row pitch is at least its row length.
  check(s.ld_a >= (s.trans_a ? s.m : s.k) && s.ld_b >= (s.trans_b ? s.k : s.n) && s.ld_out >= s.n,
        "{}: expected ld_a, ld_b and ld_out at least their rows' lengths ({}, {}, {}), got {}, {}, "
        "{}",
        where, s.trans_a ? s.m : s.k, s.trans_b ? s.k : s.n, s.n, s.ld_a, s.ld_b, s.ld_out);
  s.in = parse_dtype(r.in, where + ".in");
  s.out = parse_dtype(r.out, where + ".out");
  check(r.compute == kCompute32F || r.compute == kComputeTf32,
        "{}.compute: expected \"{}\" or \"{}\", got \"{}\"", where, kCompute32F, kComputeTf32,
        r.compute);
  s.tf32 = r.compute == kComputeTf32;
  // Only what the backend's matmuls can ask for: f32 inputs give f32 outputs and only they run
  // on TF32; a batch of matrices is dense. Any other row could never be found.
  check(s.in == DType::bf16 || s.out == DType::f32, "{}: expected out \"f32\" with in \"f32\"",
        where);
  check(!s.tf32 || s.in == DType::f32, "{}: expected compute \"{}\" with in \"bf16\"", where,
        kCompute32F);
  check(s.batch == 1 || (s.ld_a == (s.trans_a ? s.m : s.k) && s.ld_b == (s.trans_b ? s.k : s.n) &&
                         s.ld_out == s.n),
        "{}: expected ld_a, ld_b and ld_out equal to their rows' lengths with batch {}", where,
        s.batch);
  s.align_a = r.align_a, s.align_b = r.align_b, s.align_out = r.align_out;
  for (auto [value, key] :
       {std::pair{s.align_a, "align_a"}, {s.align_b, "align_b"}, {s.align_out, "align_out"}})
    check(power_of_two_up_to_256(value), "{}.{}: expected a power of two from 1 to 256, got {}",
          where, key, value);
  return s;
}

MatmulChoice to_choice(const Row& r, const std::string& where) {
  MatmulChoice c;
  check(r.algo.size() == c.algo.size(), "{}.algo: expected {} hex strings, got {}", where,
        c.algo.size(), r.algo.size());
  for (size_t i = 0; i < c.algo.size(); ++i)
    c.algo[i] = parse_hex(r.algo[i], fmt::format("{}.algo[{}]", where, i));
  for (auto [value, key] : {std::pair{r.ms, "ms"}, {r.heuristic_ms, "heuristic_ms"}})
    check(std::isfinite(value) && value > 0, "{}.{}: expected a time in ms above 0, got {}", where,
          key, value);
  c.ms = r.ms, c.heuristic_ms = r.heuristic_ms;
  return c;
}

// Collects the keys a struct visits.
struct KeyList {
  std::vector<std::string> keys;
  template <class T>
  void operator()(const char* key, T&, const char*) {
    keys.push_back(key);
  }
};

// Every key of T must be present: the reader would keep a default for a missing one.
template <class T>
void require_keys(const nlohmann::json& object, const std::string& where) {
  if (!object.is_object()) return;  // the reader names the type error
  KeyList list;
  T().visit(list);
  for (const std::string& key : list.keys)
    check(object.contains(key), "{}: missing key '{}'", where, key);
}

// Every field of a shape, in the order rows are sorted; also what the hash mixes.
auto ordering(const MatmulShape& s) {
  return std::tuple(s.m, s.n, s.k, s.batch, s.ld_a, s.ld_b, s.ld_out, s.trans_a, s.trans_b,
                    int(s.in), int(s.out), s.tf32, s.align_a, s.align_b, s.align_out);
}

}  // namespace

std::string MatmulShape::str() const {
  return fmt::format("{}x{}x{} batch {} {}{} {}->{}{} (ld {} {} {}, align {} {} {})", m, n, k,
                     batch, trans_a ? "T" : "N", trans_b ? "T" : "N", dtype_name(in),
                     dtype_name(out), tf32 ? " tf32" : "", ld_a, ld_b, ld_out, align_a, align_b,
                     align_out);
}

size_t MatmulShapeHash::operator()(const MatmulShape& s) const {
  size_t h = 0;
  std::apply(
      [&h](auto... field) {
        ((h ^= std::hash<int64_t>{}(int64_t(field)) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2)),
         ...);
      },
      ordering(s));
  return h;
}

std::string MatmulDevice::str() const {
  return fmt::format("{} ({} SMs) with cuBLASLt {}", name, sm_count, cublaslt_version);
}

MatmulTable MatmulTable::load(const std::string& path) {
  const nlohmann::json document = read_json_file(path);
  check(document.is_object(), "{}: expected a JSON object at the top level", path);
  // Unknown keys and wrong types first (the reader names the closest key), then missing ones,
  // for which the reader would keep a default.
  File file;
  config::Reader reader(document, "", config::Source{path, {}});
  file.visit(reader);
  reader.reject_unknown();
  require_keys<File>(document, path);
  for (size_t i = 0; i < file.matmuls.size(); ++i)
    require_keys<Row>(document["matmuls"][i], fmt::format("{}: matmuls[{}]", path, i));
  check(!file.device.empty(), "{}: device: expected the GPU's name", path);
  check(file.sm_count > 0, "{}: sm_count: expected the GPU's number of SMs", path);
  check(file.cublaslt_version > 0, "{}: cublaslt_version: expected cublasLtGetVersion()'s value",
        path);
  MatmulTable table(MatmulDevice{file.device, file.sm_count, file.cublaslt_version});
  table.source_ = path;
  for (size_t i = 0; i < file.matmuls.size(); ++i) {
    const std::string where = fmt::format("{}: matmuls[{}]", path, i);
    const MatmulShape shape = to_shape(file.matmuls[i], where);
    check(!table.find(shape), "{}: the shape {} appears twice; keep one", where, shape.str());
    table.put(shape, to_choice(file.matmuls[i], where));
  }
  return table;
}

std::string MatmulTable::builtin_dir() {
  // A prebuilt binary on another machine (make bundle) runs in a checkout of its commit, at
  // another path than the one it was built in.
  std::error_code error;
  const fs::path built_in = fs::path(LMTRAIN_CONFIG_DIR);
  return ((fs::is_directory(built_in, error) ? built_in : fs::path("configs")) / "matmul").string();
}

std::optional<MatmulTable> MatmulTable::find_for(const MatmulDevice& device,
                                                 const std::string& dir) {
  std::error_code error;
  if (!fs::is_directory(dir, error)) return std::nullopt;
  std::vector<fs::path> paths;
  for (const auto& entry : fs::directory_iterator(dir, error))
    if (entry.path().extension() == ".json") paths.push_back(entry.path());
  std::sort(paths.begin(), paths.end());  // the first match wins, whatever the directory order
  std::vector<std::string> other_versions;
  for (const auto& path : paths) {
    try {
      MatmulTable table = load(path.string());
      if (table.device() == device) return table;
      if (table.device().name == device.name && table.device().sm_count == device.sm_count)
        other_versions.push_back(
            fmt::format("{} ({})", table.device().cublaslt_version, path.filename().string()));
    } catch (const Error& e) {
      spdlog::warn("skipping a matmul table: {}", e.what());
    }
  }
  if (!other_versions.empty()) {
    spdlog::warn(
        "no matmul table for {}: {} has this GPU's with cuBLASLt {}; matmuls take cuBLASLt's "
        "first suggestion",
        device.str(), dir, fmt::join(other_versions, ", "));
  }
  return std::nullopt;
}

std::string MatmulTable::dump() const {
  std::vector<const std::pair<const MatmulShape, MatmulChoice>*> rows;
  for (const auto& row : choices_) rows.push_back(&row);
  std::sort(rows.begin(), rows.end(),
            [](auto* a, auto* b) { return ordering(a->first) < ordering(b->first); });
  File file{device_.name, device_.sm_count, device_.cublaslt_version, {}};
  for (const auto* row : rows) {
    const MatmulShape& s = row->first;
    const MatmulChoice& c = row->second;
    Row r{s.m,
          s.n,
          s.k,
          s.batch,
          s.ld_a,
          s.ld_b,
          s.ld_out,
          s.trans_a,
          s.trans_b,
          dtype_name(s.in),
          dtype_name(s.out),
          s.tf32 ? kComputeTf32 : kCompute32F,
          s.align_a,
          s.align_b,
          s.align_out,
          {},
          c.ms,
          c.heuristic_ms};
    for (uint64_t word : c.algo) r.algo.push_back(hex(word));
    file.matmuls.push_back(std::move(r));
  }
  // One row per line: a table diffs by shape.
  const nlohmann::json document = config::Writer::write(file);
  std::string text = "{\n  \"device\": " + document["device"].dump() +
                     ",\n  \"sm_count\": " + document["sm_count"].dump() +
                     ",\n  \"cublaslt_version\": " + document["cublaslt_version"].dump() +
                     ",\n  \"matmuls\": [";
  for (size_t i = 0; i < file.matmuls.size(); ++i)
    text += (i ? ",\n    " : "\n    ") + document["matmuls"][i].dump();
  text += file.matmuls.empty() ? "]\n}\n" : "\n  ]\n}\n";
  return text;
}

void MatmulTable::save(const std::string& path) const {
  const std::string staging = fmt::format("{}.tmp-{}", path, ::getpid());
  try {
    write_file_synced(staging, dump());
    rename_or_fail(staging, path);
  } catch (const Error&) {
    std::error_code ignored;
    fs::remove(staging, ignored);
    throw;
  }
  const fs::path parent = fs::path(path).parent_path();
  fsync_path(parent.empty() ? "." : parent.string());
}

void MatmulTable::merge_into(const std::string& path) const {
  const std::string lock_path = path + ".lock";
  UniqueFd lock = open_file(lock_path, O_RDWR | O_CREAT);
  while (::flock(lock.get(), LOCK_EX) != 0) {
    check(errno == EINTR, "{}: cannot lock: {}", lock_path, std::strerror(errno));
  }
  std::error_code error;
  const bool exists = fs::exists(path, error);
  check(!error, "{}: cannot read: {}", path, error.message());
  MatmulTable merged = exists ? load(path) : MatmulTable(device_);
  check(merged.device() == device_, "{}: a table for {}, but this is {}", path,
        merged.device().str(), device_.str());
  for (const auto& [shape, choice] : choices_)
    if (!merged.find(shape)) merged.put(shape, choice);
  merged.save(path);
}

const MatmulChoice* MatmulTable::find(const MatmulShape& shape) const {
  auto it = choices_.find(shape);
  return it == choices_.end() ? nullptr : &it->second;
}

}  // namespace lmtrain
