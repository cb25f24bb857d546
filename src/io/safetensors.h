// The HuggingFace safetensors format, so checkpoints open in Python (`safetensors`, `transformers`)
// without custom code:
//   8-byte little-endian header length N | N bytes of JSON header, space-padded | tensor bytes
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the data section) plus an optional "__metadata__" object of string -> string.
// See docs/FORMATS.md for the subset written and the validation done on read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "io/atomic_dir.h"

namespace lmtrain {

struct SafeTensorInfo {
  std::string name;
  std::string dtype;           // "F32", "BF16", "I64", ...
  std::vector<int64_t> shape;  // empty for a scalar
  uint64_t offset = 0;         // absolute byte offset of the data in the file
  uint64_t bytes = 0;
};

// Collects tensors in memory (data is copied at add(), so callers may free their buffers) and
// writes them in insertion order with no gaps, as the format requires.
class SafetensorsWriter {
 public:
  // `bytes` must equal the element count of `shape` times the size of `dtype`.
  void add(std::string name, std::string dtype, std::vector<int64_t> shape, const void* data,
           size_t bytes);
  void set_metadata(std::string key, std::string value);
  // Writes `path` (create/truncate) and fsyncs it. Not atomic by itself: stage it in an AtomicDir.
  void write(const std::string& path) const;

 private:
  struct Entry {
    SafeTensorInfo info;
    std::vector<std::byte> data;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// A validated, open safetensors file. The header is parsed and checked at open(); tensor data is
// read on demand with pread, so opening a large checkpoint to inspect it is cheap.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<SafeTensorInfo>& tensors() const { return tensors_; }  // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafeTensorInfo& info(const std::string& name) const;  // throws naming file and tensor

  // Copies the raw little-endian bytes of `name` into `dst`; `bytes` must equal its size.
  void read(const std::string& name, void* dst, size_t bytes) const;
  // The tensor's values; its dtype must be F32.
  std::vector<float> read_f32(const std::string& name) const;

 private:
  std::string path_;
  UniqueFd fd_;
  std::vector<SafeTensorInfo> tensors_;
  std::map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

}  // namespace lmtrain
