#include "io/safetensors.h"

#include <fcntl.h>
#include <fmt/ranges.h>
#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>
#include <tuple>

#include "core/error.h"
#include "io/json_reason.h"

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian and is copied without byte swapping");

namespace lmtrain {
namespace {

using nlohmann::json;

// Same cap as the Python/Rust reader: a larger "header length" means a corrupt or foreign file,
// and refusing it avoids a huge allocation.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

std::optional<uint64_t> dtype_size(std::string_view dtype) {
  static constexpr std::pair<std::string_view, uint64_t> kSizes[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"U16", 2},  {"I16", 2}, {"F16", 2}, {"BF16", 2},    {"U32", 4},
      {"I32", 4},  {"F32", 4}, {"U64", 8}, {"I64", 8},     {"F64", 8}};
  for (const auto& [name, size] : kSizes)
    if (name == dtype) return size;
  return std::nullopt;
}

// Bytes a tensor of this dtype and shape occupies, or nullopt if a dimension is negative or the
// product overflows (both mean a corrupt header or a caller bug).
std::optional<uint64_t> tensor_bytes(uint64_t elem_size, const std::vector<int64_t>& shape) {
  uint64_t total = elem_size;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(total, static_cast<uint64_t>(d), &total))
      return std::nullopt;
  return total;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// One header entry -> SafeTensorInfo with offsets still relative to the data section.
SafeTensorInfo parse_entry(const std::string& path, const std::string& name, const json& entry) {
  check(entry.is_object(), "{}: tensor '{}': expected a JSON object", path, name);
  for (const char* key : {"dtype", "shape", "data_offsets"})
    check(entry.contains(key), "{}: tensor '{}': missing \"{}\"", path, name, key);
  const json& dtype = entry["dtype"];
  const json& shape = entry["shape"];
  const json& offsets = entry["data_offsets"];

  check(dtype.is_string(), "{}: tensor '{}': \"dtype\" must be a string", path, name);
  SafeTensorInfo info;
  info.name = name;
  info.dtype = dtype.get<std::string>();
  std::optional<uint64_t> elem = dtype_size(info.dtype);
  check(elem.has_value(), "{}: tensor '{}': unknown dtype '{}'", path, name, info.dtype);

  check(shape.is_array(), "{}: tensor '{}': \"shape\" must be an array", path, name);
  for (const json& d : shape) {
    check(d.is_number_unsigned() && d.get<uint64_t>() <= uint64_t(INT64_MAX),
          "{}: tensor '{}': shape entries must be non-negative integers", path, name);
    info.shape.push_back(d.get<int64_t>());
  }

  check(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
            offsets[1].is_number_unsigned(),
        "{}: tensor '{}': \"data_offsets\" must be [begin, end] with non-negative integers", path,
        name);
  const auto begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
  check(begin <= end, "{}: tensor '{}': data_offsets [{}, {}] end before they begin", path, name,
        begin, end);
  std::optional<uint64_t> expected = tensor_bytes(*elem, info.shape);
  check(expected.has_value(), "{}: tensor '{}': shape {} is too large", path, name,
        shape_str(info.shape));
  check(end - begin == *expected,
        "{}: tensor '{}': data_offsets [{}, {}] span {} bytes but {} {} needs {}", path, name,
        begin, end, end - begin, info.dtype, shape_str(info.shape), *expected);
  info.offset = begin;
  info.bytes = end - begin;
  return info;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const json& meta) {
  check(meta.is_object(), "{}: \"__metadata__\" must be an object of strings", path);
  std::map<std::string, std::string> out;
  for (const auto& [key, value] : meta.items()) {
    check(value.is_string(), "{}: \"__metadata__\" value of '{}' must be a string", path, key);
    out[key] = value.get<std::string>();
  }
  return out;
}

}  // namespace

void SafetensorsWriter::add(std::string name, std::string dtype, std::vector<int64_t> shape,
                            const void* data, size_t bytes) {
  check(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name '{}'", name);
  check(std::none_of(entries_.begin(), entries_.end(),
                     [&](const Entry& e) { return e.info.name == name; }),
        "safetensors: tensor '{}' added twice", name);
  std::optional<uint64_t> elem = dtype_size(dtype);
  check(elem.has_value(), "safetensors: tensor '{}': unknown dtype '{}'", name, dtype);
  std::optional<uint64_t> expected = tensor_bytes(*elem, shape);
  check(expected == bytes, "safetensors: tensor '{}': got {} bytes but {} {} needs {}", name, bytes,
        dtype, shape_str(shape), expected.value_or(0));
  const auto* p = static_cast<const std::byte*>(data);
  entries_.push_back({.info = {.name = std::move(name),
                               .dtype = std::move(dtype),
                               .shape = std::move(shape),
                               .bytes = bytes},
                      .data = std::vector<std::byte>(p, p + bytes)});
}

void SafetensorsWriter::set_metadata(std::string key, std::string value) {
  metadata_[std::move(key)] = std::move(value);
}

void SafetensorsWriter::write(const std::string& path) const {
  json header = json::object();
  uint64_t offset = 0;
  for (const Entry& e : entries_) {
    header[e.info.name] = {{"dtype", e.info.dtype},
                           {"shape", e.info.shape},
                           {"data_offsets", {offset, offset + e.info.bytes}}};
    offset += e.info.bytes;
  }
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::string text = header.dump();
  // Padding the header to a multiple of 8 keeps the data section 8-byte aligned for mmap readers.
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t length = text.size();  // little-endian host, see static_assert

  UniqueFd fd = open_file(path, O_WRONLY | O_CREAT | O_TRUNC);
  write_all(fd.get(), &length, sizeof length, path);
  write_all(fd.get(), text.data(), text.size(), path);
  for (const Entry& e : entries_) write_all(fd.get(), e.data.data(), e.data.size(), path);
  fd.sync(path);
  fd.close(path);
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  file.path_ = path;
  file.fd_ = open_file(path, O_RDONLY);
  struct stat st {};
  if (::fstat(file.fd_.get(), &st) != 0) fail("{}: cannot stat: {}", path, std::strerror(errno));
  const auto size = static_cast<uint64_t>(st.st_size);
  check(size >= 8, "{}: not a safetensors file: {} bytes, expected at least 8", path, size);

  uint64_t header_len = 0;
  pread_all(file.fd_.get(), &header_len, sizeof header_len, 0, path);
  check(header_len <= size - 8, "{}: header length {} exceeds the {} bytes after it (truncated?)",
        path, header_len, size - 8);
  check(header_len <= kMaxHeaderBytes, "{}: header length {} exceeds the {}-byte limit", path,
        header_len, kMaxHeaderBytes);
  std::string text(header_len, '\0');
  pread_all(file.fd_.get(), text.data(), text.size(), 8, path);

  json header;
  try {
    header = json::parse(text);
  } catch (const json::parse_error& e) {
    fail("{}: header is not valid JSON (error at byte {} of {})", path, e.byte, header_len);
  } catch (const json::exception& e) {  // a number out of range
    fail("{}: header is not valid JSON ({})", path, json_reason(e));
  }
  // As the format says (and the Python reader checks): the object starts the header, and only
  // spaces may pad it (the JSON parser would also skip a byte-order mark and other whitespace).
  const size_t last = text.find_last_not_of(' ');
  check(header.is_object() && text.front() == '{' && text[last] == '}',
        "{}: header must be a JSON object, padded with spaces only", path);
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__")
      file.metadata_ = parse_metadata(path, entry);
    else
      file.tensors_.push_back(parse_entry(path, name, entry));
  }

  // The format requires the data section to be tiled exactly: no overlaps, no holes, nothing
  // after the last tensor. Checking in offset order reports the first damaged tensor.
  // Ties broken by size so an empty tensor sharing its offset with the next one sorts first.
  std::sort(file.tensors_.begin(), file.tensors_.end(), [](const auto& a, const auto& b) {
    return std::tie(a.offset, a.bytes) < std::tie(b.offset, b.bytes);
  });
  const uint64_t data_bytes = size - 8 - header_len;
  uint64_t pos = 0;
  std::string_view prev;
  for (SafeTensorInfo& t : file.tensors_) {
    check(t.offset >= pos, "{}: tensors '{}' and '{}' overlap at data byte {}", path, prev, t.name,
          t.offset);
    check(t.offset == pos, "{}: {} unused bytes before tensor '{}' at data byte {}", path,
          t.offset - pos, t.name, pos);
    pos = t.offset + t.bytes;
    check(pos <= data_bytes, "{}: truncated: tensor '{}' ends at byte {} but data holds {} bytes",
          path, t.name, pos, data_bytes);
    t.offset += 8 + header_len;
    prev = t.name;
  }
  check(pos == data_bytes, "{}: {} unexpected bytes after the last tensor", path, data_bytes - pos);
  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_[file.tensors_[i].name] = i;
  return file;
}

const SafeTensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  check(it != index_.end(), "{}: no tensor named '{}' ({} tensors in file)", path_, name,
        tensors_.size());
  return tensors_[it->second];
}

void SafetensorsFile::read(const std::string& name, void* dst, size_t bytes) const {
  const SafeTensorInfo& t = info(name);
  check(bytes == t.bytes, "{}: tensor '{}' ({} {}) holds {} bytes, caller expected {}", path_, name,
        t.dtype, shape_str(t.shape), t.bytes, bytes);
  pread_all(fd_.get(), dst, bytes, t.offset, path_);
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name) const {
  const SafeTensorInfo& t = info(name);
  check(t.dtype == "F32", "{}: tensor '{}' has dtype {}, expected F32", path_, name, t.dtype);
  std::vector<float> out(t.bytes / sizeof(float));
  read(name, out.data(), t.bytes);
  return out;
}

}  // namespace lmtrain
