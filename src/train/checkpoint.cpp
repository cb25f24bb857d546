#include "train/checkpoint.h"

#include <filesystem>

#include "io/atomic_dir.h"
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

// Reads `name` from `file` into device tensor `dst` after checking dtype and shape.
void read_into(const SafetensorsFile& file, const std::string& name, Backend& backend, Tensor dst) {
  const SafeTensorInfo& info = file.info(name);
  check(info.dtype == "F32", "{}: tensor '{}' has dtype {}, expected F32", file.path(), name,
        info.dtype);
  Shape shape;
  check(int(info.shape.size()) <= kMaxRank, "{}: tensor '{}' has rank {}", file.path(), name,
        info.shape.size());
  for (int64_t d : info.shape) shape.dims[shape.rank++] = d;
  if (shape.rank == 0) shape = Shape{1};
  check(shape == dst.shape, "{}: tensor '{}' has shape {}, this model expects {}", file.path(),
        name, shape.str(), dst.shape.str());
  backend.upload(dst, file.read_f32(name).data());
}

}  // namespace

std::string save_checkpoint(const std::string& parent, const nlohmann::json& resolved_config,
                            const Gpt& model, const Optimizer* optimizer, const LoopState& loop,
                            const std::string& tokenizer_path) {
  Backend& backend = const_cast<Gpt&>(model).backend();
  AtomicDir dir(parent, fmt::format("step_{:06d}", loop.step));

  SafetensorsWriter weights;
  weights.set_metadata("format", "pt");
  for (const auto& spec : model.table().specs) {
    auto host = to_host(backend, model.param(spec));
    weights.add(spec.name, "F32", dims(spec.shape), host.data(), host.size() * sizeof(float));
  }
  weights.write(dir.path("model.safetensors"));

  nlohmann::json meta = {{"format_version", kFormatVersion}, {"config", resolved_config},
                         {"step", loop.step},  {"loader", loop.loader},
                         {"extra", loop.extra}};
  if (optimizer) {
    SafetensorsWriter state;
    for (const auto& [name, tensor] : optimizer->state()) {
      auto host = to_host(backend, tensor);
      state.add(name, "F32", dims(tensor.shape), host.data(), host.size() * sizeof(float));
    }
    state.write(dir.path("optimizer.safetensors"));
    meta["optimizer_updates"] = optimizer->updates();
  }
  write_file_synced(dir.path("tokenizer.json"), read_file(tokenizer_path));
  write_file_synced(dir.path("meta.json"), meta.dump(2));
  dir.commit();
  return dir.final_dir();
}

std::string resolve_checkpoint(const std::string& path) {
  check(fs::is_directory(path), "{}: no such checkpoint directory", path);
  if (fs::exists(fs::path(path) / "meta.json")) return path;
  for (fs::path parent : {fs::path(path), fs::path(path) / "ckpt"}) {
    if (!fs::exists(parent / "latest")) continue;
    auto name = read_latest(parent.string());
    if (name) return (parent / *name).string();
  }
  fail("{}: not a checkpoint (no meta.json) and no 'latest' pointer in it or in its ckpt/", path);
}

nlohmann::json read_checkpoint_meta(const std::string& dir) {
  const std::string path = (fs::path(dir) / "meta.json").string();
  auto meta = nlohmann::json::parse(read_file(path), nullptr, /*allow_exceptions=*/false);
  check(meta.is_object(), "{}: not valid JSON", path);
  for (const char* key : {"format_version", "config", "step", "loader"}) {
    check(meta.contains(key), "{}: missing key '{}'", path, key);
  }
  check(meta["format_version"] == kFormatVersion, "{}: format_version {} is not the supported {}",
        path, meta["format_version"].dump(), kFormatVersion);
  return meta;
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
  auto file = SafetensorsFile::open((fs::path(dir) / "optimizer.safetensors").string());
  for (const auto& [name, tensor] : optimizer.state()) {
    check(file.contains(name), "{}: missing tensor '{}' (was it saved with another optimizer?)",
          file.path(), name);
    read_into(file, name, optimizer.model().backend(), tensor);
  }
  auto meta = read_checkpoint_meta(dir);
  check(meta.contains("optimizer_updates"), "{}/meta.json: missing key 'optimizer_updates'", dir);
  optimizer.set_updates(meta["optimizer_updates"].get<int>());
}

}  // namespace lmtrain
