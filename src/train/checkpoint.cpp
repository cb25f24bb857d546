#include "train/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>

#include "config/schema.h"
#include "data/loader.h"
#include "io/atomic_dir.h"
#include "io/json_reason.h"
#include "io/safetensors.h"

namespace lmtrain {

namespace fs = std::filesystem;

namespace {

constexpr int kFormatVersion = 1;

std::vector<int64_t> dims(const Shape& s) { return {s.dims.begin(), s.dims.begin() + s.rank}; }

std::vector<float> to_host(Backend& backend, Tensor t) {
  std::vector<float> host(t.numel());
  backend.download(host.data(), t);
  return host;
}

Shape shape_of(const SafeTensorInfo& info, const std::string& path) {
  check(int(info.shape.size()) <= kMaxRank, "{}: tensor '{}' has rank {}", path, info.name,
        info.shape.size());
  Shape shape;
  for (int64_t d : info.shape) shape.dims[shape.rank++] = d;
  return shape.rank == 0 ? Shape{1} : shape;
}

// Throws naming `what` and the first element that is NaN or Inf.
void require_finite(const std::vector<float>& values, const std::string& what) {
  const auto bad =
      std::find_if(values.begin(), values.end(), [](float v) { return !std::isfinite(v); });
  if (bad != values.end()) fail("{} holds {} at element {}", what, *bad, bad - values.begin());
}

// Reads `name` from `file` into device tensor `dst` after checking dtype, shape and values.
void read_into(const SafetensorsFile& file, const std::string& name, Backend& backend, Tensor dst) {
  const SafeTensorInfo& info = file.info(name);
  check(info.dtype == "F32", "{}: tensor '{}' has dtype {}, expected F32", file.path(), name,
        info.dtype);
  const Shape shape = shape_of(info, file.path());
  check(shape == dst.shape, "{}: tensor '{}' has shape {}, this model expects {}", file.path(),
        name, shape.str(), dst.shape.str());
  const std::vector<float> values = file.read_f32(name);
  require_finite(values, fmt::format("{}: tensor '{}'", file.path(), name));
  backend.upload(dst, values.data());
}

// The first row of a sharded optimizer tensor, from the "rows.<name>" metadata "begin,total".
int64_t saved_row_begin(const SafetensorsFile& shard, const std::string& name) {
  auto it = shard.metadata().find("rows." + name);
  if (it == shard.metadata().end()) return 0;
  const std::string& text = it->second;
  int64_t begin = -1, total = -1;
  const auto comma = text.find(',');
  if (comma != std::string::npos) {
    auto [p, ec] = std::from_chars(text.data(), text.data() + comma, begin);
    auto [q, ec2] = std::from_chars(text.data() + comma + 1, text.data() + text.size(), total);
    if (ec != std::errc() || p != text.data() + comma || ec2 != std::errc() ||
        q != text.data() + text.size())
      begin = -1;
  }
  // begin == total: the saving rank owned none of the rows (more ranks than row chunks).
  check(begin >= 0 && total > 0 && begin <= total,
        "{}: metadata 'rows.{}' is \"{}\", expected \"begin,total\" with 0 <= begin <= total",
        shard.path(), name, text);
  return begin;
}

std::string shard_name(int rank, int world) {
  return world == 1 ? "optimizer.safetensors"
                    : fmt::format("optimizer.rank{:05d}.safetensors", rank);
}

std::string loader_name(int rank) { return fmt::format("loader.rank{:05d}.json", rank); }

}  // namespace

std::string save_checkpoint(const std::string& parent, const nlohmann::json& resolved_config,
                            const Gpt& model, const Optimizer* optimizer, const LoopState& loop,
                            const std::string& tokenizer_path, dist::Communicator& comm) {
  Backend& backend = const_cast<Gpt&>(model).backend();
  const int rank = comm.rank(), world = comm.world_size();
  const std::string name = fmt::format("step_{:06d}", loop.step);
  // Rank 0 owns the staging directory; the others learn its path from rank 0's pid.
  std::optional<AtomicDir> dir;
  if (rank == 0) dir.emplace(parent, name);
  std::string staging = rank == 0 ? dir->staging_dir() : "";
  if (world > 1) {
    Buffer memory = backend.allocate(sizeof(int32_t));
    Tensor pid = memory.tensor({1}, DType::i32);
    const int32_t mine = int32_t(::getpid());
    backend.upload(pid, &mine);
    comm.broadcast(pid, 0);
    int32_t owner = 0;
    backend.download(&owner, pid);
    staging = AtomicDir::staging_path(parent, name, owner);
  }
  auto path = [&](const std::string& file) { return staging + "/" + file; };

  nlohmann::json meta = {{"format_version", kFormatVersion},
                         {"config", resolved_config},
                         {"step", loop.step},
                         {"world_size", world},
                         {"loader", loop.loader},
                         {"extra", loop.extra}};
  // A NaN or Inf in the weights would poison every run resumed from here. They are the same on
  // every rank, so every rank checks them before writing anything, and all stop together. (The
  // optimizer state is checked when loaded: it is sharded, and only non-finite gradients, which
  // stop a step before its update, or a loaded state could make it non-finite.) Rank 0 writes
  // the weights it checked; the other ranks drop theirs.
  SafetensorsWriter weights;
  weights.set_metadata("format", "pt");
  for (const auto& spec : model.table().specs) {
    const auto host = to_host(backend, model.param(spec));
    require_finite(host, fmt::format("step {}: parameter '{}'", loop.step, spec.name));
    weights.add(spec.name, "F32", dims(spec.shape), host.data(), host.size() * sizeof(float));
  }
  if (optimizer) {
    SafetensorsWriter state;
    for (const StateTensor& st : optimizer->state()) {
      if (st.replicated && rank != 0) continue;
      auto host = to_host(backend, st.tensor);
      state.add(st.name, "F32", dims(st.tensor.shape), host.data(), host.size() * sizeof(float));
      if (st.rows_total > 0) {
        state.set_metadata("rows." + st.name, fmt::format("{},{}", st.row_begin, st.rows_total));
      }
    }
    state.write(path(shard_name(rank, world)));
    meta["optimizer_updates"] = optimizer->updates();
  }
  if (world > 1) write_file_synced(path(loader_name(rank)), loop.loader.dump());
  comm.barrier();  // every shard is on disk before rank 0 commits
  if (rank == 0) {
    weights.write(path("model.safetensors"));
    write_file_synced(path("tokenizer.json"), read_file(tokenizer_path));
    write_file_synced(path("meta.json"), meta.dump(2));
    dir->commit();
  }
  comm.barrier();  // nobody moves on (or reads the checkpoint) before the commit
  return (fs::path(parent) / name).string();
}

std::string resolve_checkpoint(const std::string& path) {
  // error_code forms: a name too long or a loop of links is an answer here, not an exception.
  std::error_code ec;
  check(fs::exists(path, ec), "{}: no such checkpoint directory{}", path,
        ec ? " (" + ec.message() + ")" : "");
  check(fs::is_directory(path, ec), "{}: not a directory, expected a checkpoint directory", path);
  if (fs::exists(fs::path(path) / "meta.json", ec)) return path;
  for (fs::path parent : {fs::path(path), fs::path(path) / "ckpt"}) {
    // Not following links: read_latest reports one that leads nowhere.
    if (!fs::exists(fs::symlink_status(parent / "latest", ec))) continue;
    auto name = read_latest(parent.string());
    if (name) return (parent / *name).string();
  }
  fail("{}: not a checkpoint (no meta.json) and no 'latest' pointer in it or in its ckpt/", path);
}

nlohmann::json read_checkpoint_meta(const std::string& dir) {
  const std::string path = (fs::path(dir) / "meta.json").string();
  auto meta = parse_json(read_file(path), path);
  check(meta.is_object(), "{}: expected a JSON object, got {}", path, config::describe(meta));
  for (const char* key : {"format_version", "config", "step", "loader"}) {
    check(meta.contains(key), "{}: missing key '{}'", path, key);
  }
  check(meta["format_version"] == kFormatVersion, "{}: format_version {} is not the supported {}",
        path, meta["format_version"].dump(), kFormatVersion);
  auto integer = [&](const char* key, int64_t min) {
    const auto& v = meta[key];
    check(v.is_number_integer() && v.get<int64_t>() >= min && v.get<int64_t>() <= INT32_MAX,
          "{}: '{}' must be an integer >= {}, got {}", path, key, min, v.dump());
  };
  check(meta["config"].is_object(), "{}: 'config' must be an object", path);
  integer("step", 0);
  if (meta.contains("world_size")) integer("world_size", 1);
  if (meta.contains("optimizer_updates")) integer("optimizer_updates", 0);
  check(meta["loader"].is_object(), "{}: 'loader' must be an object", path);
  if (!meta.contains("extra")) meta["extra"] = nlohmann::json::object();
  const nlohmann::json& extra = meta["extra"];
  check(extra.is_object() &&
            (!extra.contains("trained_seconds") || extra["trained_seconds"].is_number()) &&
            (!extra.contains("metrics_bytes") || extra["metrics_bytes"].is_number_unsigned()) &&
            (!extra.contains("evaluated") || extra["evaluated"].is_boolean()),
        "{}: 'extra' must be an object with a number trained_seconds, a non-negative integer "
        "metrics_bytes and a boolean evaluated",
        path);
  return meta;
}

nlohmann::json checkpoint_loader_state(const std::string& dir, int rank, int world,
                                       int64_t batch_tokens) {
  const auto meta = read_checkpoint_meta(dir);
  const std::string meta_path = (fs::path(dir) / "meta.json").string();
  auto well_formed = [](const nlohmann::json& state, const std::string& path) {
    const std::string problem = TokenLoader::state_problem(state);
    check(problem.empty(), "{}: loader state: {}", path, problem);
  };
  const int saved_world = meta.value("world_size", 1);
  if (saved_world == world) {
    if (world == 1) {
      well_formed(meta["loader"], meta_path);
      return meta["loader"];
    }
    const std::string path = (fs::path(dir) / loader_name(rank)).string();
    auto state = parse_json(read_file(path), path);
    well_formed(state, path);
    return state;
  }
  // Another world size: continue from rank 0's position, each rank taking its own part from
  // there on. The data order differs from an uninterrupted run from this point.
  nlohmann::json state = meta["loader"];
  well_formed(state, meta_path);
  state["config"]["rank"] = rank;
  state["config"]["world"] = world;
  if (state["config"].value("packing", "") == "contiguous") {
    state["position"] = state["position"].get<int64_t>() + rank * batch_tokens;
  }
  return state;
}

void load_model_weights(const std::string& dir, Gpt& model) {
  auto file = SafetensorsFile::open((fs::path(dir) / "model.safetensors").string());
  for (const auto& spec : model.table().specs) {
    check(file.contains(spec.name), "{}: missing tensor '{}'", file.path(), spec.name);
    read_into(file, spec.name, model.backend(), model.param(spec));
  }
  check(file.tensors().size() == model.table().specs.size(),
        "{}: holds {} tensors, this model has {}", file.path(), file.tensors().size(),
        model.table().specs.size());
  model.refresh_weights();
}

void load_optimizer_state(const std::string& dir, Optimizer& optimizer) {
  std::vector<SafetensorsFile> shards;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string file = entry.path().filename().string();
    if (file.starts_with("optimizer") && file.ends_with(".safetensors")) {
      shards.push_back(SafetensorsFile::open(entry.path().string()));
    }
  }
  check(!shards.empty(), "{}: no optimizer*.safetensors (saved without optimizer state?)", dir);
  Backend& backend = optimizer.model().backend();
  for (const StateTensor& st : optimizer.state()) {
    // The rows this rank holds, assembled from whichever shards hold them.
    const int64_t rows = st.tensor.dim(0);
    if (rows == 0) continue;  // a rank that holds none of this tensor's rows
    const int64_t row_len = st.tensor.numel() / rows;
    const int64_t want_begin = st.row_begin, want_end = want_begin + rows;
    std::vector<float> host(st.tensor.numel());
    int64_t covered = 0;
    for (const auto& shard : shards) {
      if (!shard.contains(st.name)) continue;
      const SafeTensorInfo& info = shard.info(st.name);
      check(info.dtype == "F32", "{}: tensor '{}' has dtype {}, expected F32", shard.path(),
            st.name, info.dtype);
      // Any number of rows (the saving rank's share), each shaped as this model's: a shape that
      // only agrees in row length ((L, c, r) for (L, r, c), (n, 8, 8) for (n, 64)) would load
      // scrambled.
      const Shape shape = shape_of(info, shard.path());
      Shape expected = st.tensor.shape;
      expected.dims[0] = shape[0];
      check(shape == expected,
            "{}: tensor '{}' has shape {}, expected {}: any number of rows, each shaped as this "
            "model's",
            shard.path(), st.name, shape.str(), expected.str());
      const int64_t begin = saved_row_begin(shard, st.name);
      if (shape[0] == 0) continue;  // the saving rank held none of its rows
      const int64_t end = begin + shape[0];
      const int64_t lo = std::max(begin, want_begin), hi = std::min(end, want_end);
      if (lo >= hi) continue;
      const auto values = shard.read_f32(st.name);
      require_finite(values, fmt::format("{}: tensor '{}'", shard.path(), st.name));
      std::copy(values.begin() + (lo - begin) * row_len, values.begin() + (hi - begin) * row_len,
                host.begin() + (lo - want_begin) * row_len);
      covered += hi - lo;
    }
    check(covered == rows,
          "{}: optimizer state '{}' rows [{}, {}) are not all saved (found {} of {})", dir, st.name,
          want_begin, want_end, covered, rows);
    backend.upload(st.tensor, host.data());
  }
  auto meta = read_checkpoint_meta(dir);
  check(meta.contains("optimizer_updates"), "{}/meta.json: missing key 'optimizer_updates'", dir);
  optimizer.set_updates(meta["optimizer_updates"].get<int>());
}

}  // namespace lmtrain
