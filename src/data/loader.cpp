#include "data/loader.h"

#include <algorithm>
#include <filesystem>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"

namespace lmtrain {

Packing parse_packing(std::string_view name) {
  if (name == "contiguous") return Packing::contiguous;
  if (name == "bos_bestfit") return Packing::bos_bestfit;
  fail("unknown packing '{}', expected contiguous or bos_bestfit", name);
}

namespace {

const char* packing_name(Packing p) {
  return p == Packing::contiguous ? "contiguous" : "bos_bestfit";
}

}  // namespace

TokenLoader::TokenLoader(LoaderOptions options) : options_(std::move(options)) {
  const auto& o = options_;
  check(o.batch > 0 && o.seq > 0,
        "data loader: batch size and sequence length must be positive, got B={} T={}", o.batch,
        o.seq);
  check(o.world > 0 && o.rank >= 0 && o.rank < o.world,
        "data loader: rank {} is not in [0, world size {})", o.rank, o.world);
  check(!o.shards.empty(), "data loader: no shards given");
  for (const auto& path : o.shards) shards_.emplace_back(path);

  size_t largest = 0, total = 0;
  std::string largest_path = o.shards.front();
  for (const auto& shard : shards_) {
    if (shard.size() > largest) largest = shard.size(), largest_path = shard.path();
    total += shard.size();
  }
  const size_t bt = size_t(o.batch) * size_t(o.seq);
  if (o.packing == Packing::contiguous) {
    const size_t needed = size_t(o.rank) * bt + bt + 1;
    check(largest >= needed,
          "{}: a contiguous batch of B={} T={} for rank {} of {} needs a shard of at least {} "
          "tokens, but the largest of {} shard(s) (this one) holds {}",
          largest_path, o.batch, o.seq, o.rank, o.world, needed, shards_.size(), largest);
  } else {
    check(total > 0, "{}: the {} shard(s) hold no tokens", o.shards.front(), shards_.size());
    for (const auto& shard : shards_)
      check(shard.size() == 0 || shard.token(0) == uint32_t(o.bos_id),
            "{}: bos_bestfit packing needs shards that start with the BOS token {}, found {}",
            shard.path(), o.bos_id, shard.size() ? shard.token(0) : 0);
  }
  start_epoch(0);
  position_ = first_position();
}

void TokenLoader::start_epoch(uint64_t epoch) {
  epoch_ = epoch;
  cursor_ = 0;
  order_.resize(shards_.size());
  std::iota(order_.begin(), order_.end(), size_t{0});
  if (!options_.shuffle) return;
  // Fisher-Yates with the portable Rng, so the order is the same on every platform.
  Rng rng(options_.seed * 0x9E3779B97F4A7C15ull + epoch);
  for (size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng.next() % i]);
}

void TokenLoader::advance_shard() {
  if (++cursor_ == order_.size()) {
    // Ranks take documents by their index within the epoch, so a rank that got none in this
    // epoch never will.
    check(options_.packing == Packing::contiguous || documents_ > uint64_t(options_.rank),
          "data loader: rank {} of {} got no document in a whole pass over {} shard(s)",
          options_.rank, options_.world, shards_.size());
    documents_ = 0;
    start_epoch(epoch_ + 1);
  }
  position_ = first_position();
}

size_t TokenLoader::first_position() const {
  return options_.packing == Packing::contiguous
             ? size_t(options_.rank) * options_.batch * options_.seq
             : 0;
}

void TokenLoader::next_batch(std::span<int32_t> inputs, std::span<int32_t> targets) {
  const size_t B = options_.batch, T = options_.seq;
  check(inputs.size() == B * T && targets.size() == B * T,
        "data loader: batch buffers hold {} and {} tokens, expected B*T = {}", inputs.size(),
        targets.size(), B * T);
  if (options_.packing == Packing::contiguous) {
    scratch_.resize(B * T + 1);
    fill_contiguous(scratch_);
    std::copy_n(scratch_.begin(), B * T, inputs.begin());
    std::copy_n(scratch_.begin() + 1, B * T, targets.begin());
    return;
  }
  scratch_.resize(T + 1);
  for (size_t b = 0; b < B; ++b) {
    fill_row_bestfit(scratch_);
    std::copy_n(scratch_.begin(), T, inputs.begin() + b * T);
    std::copy_n(scratch_.begin() + 1, T, targets.begin() + b * T);
  }
}

void TokenLoader::fill_contiguous(std::span<int32_t> tokens) {
  // The constructor checked that some shard is long enough, so this loop ends within an epoch.
  while (position_ + tokens.size() > current().size()) advance_shard();
  current().copy(position_, tokens, options_.vocab);
  position_ += size_t(options_.world) * options_.batch * options_.seq;
}

TokenLoader::Doc TokenLoader::next_document() {
  const auto bos = uint32_t(options_.bos_id);
  for (;;) {
    if (position_ >= current().size()) {
      advance_shard();
      continue;
    }
    const TokenShard& shard = current();
    const size_t begin = position_;
    size_t end = begin + 1;
    while (end < shard.size() && shard.token(end) != bos) ++end;
    position_ = end;
    if (documents_++ % options_.world == uint64_t(options_.rank)) {
      return {order_[cursor_], begin, end - begin};
    }
  }
}

void TokenLoader::fill_row_bestfit(std::span<int32_t> row) {
  size_t filled = 0;
  while (filled < row.size()) {
    while (buffer_.size() < kBufferDocs) buffer_.push_back(next_document());
    const size_t room = row.size() - filled;
    // The largest document that fits; on ties the one read first.
    auto pick = buffer_.end();
    for (auto it = buffer_.begin(); it != buffer_.end(); ++it)
      if (it->length <= room && (pick == buffer_.end() || it->length > pick->length)) pick = it;
    size_t take = 0;
    if (pick != buffer_.end()) {
      take = pick->length;
    } else {  // nothing fits: crop the shortest document to fill the row exactly
      pick = std::min_element(buffer_.begin(), buffer_.end(),
                              [](const Doc& a, const Doc& b) { return a.length < b.length; });
      take = room;
    }
    shards_[pick->shard].copy(pick->begin, row.subspan(filled, take), options_.vocab);
    filled += take;
    buffer_.erase(pick);
  }
}

nlohmann::json TokenLoader::fingerprint() const {
  const auto& o = options_;
  nlohmann::json shards = nlohmann::json::array();
  for (const auto& shard : shards_)
    shards.push_back({std::filesystem::path(shard.path()).filename().string(), shard.size()});
  return {{"packing", packing_name(o.packing)},
          {"batch", o.batch},
          {"seq", o.seq},
          {"rank", o.rank},
          {"world", o.world},
          {"seed", o.seed},
          {"bos_id", o.bos_id},
          {"shuffle", o.shuffle},
          {"shards", shards}};
}

nlohmann::json TokenLoader::state() const {
  nlohmann::json buffer = nlohmann::json::array();
  for (const auto& doc : buffer_) buffer.push_back({doc.shard, doc.begin, doc.length});
  return {{"config", fingerprint()}, {"epoch", epoch_},         {"cursor", cursor_},
          {"position", position_},   {"documents", documents_}, {"buffer", buffer}};
}

std::string TokenLoader::state_problem(const nlohmann::json& state) {
  auto integer = [](const nlohmann::json& v) {
    return v.is_number_integer() && v.get<int64_t>() >= 0;
  };
  if (!state.is_object() || !state.contains("config") || !state["config"].is_object())
    return "expected an object with a 'config' object";
  for (const char* key : {"epoch", "cursor", "position", "documents"}) {
    if (!state.contains(key) || !integer(state[key]))
      return fmt::format("'{}' must be a non-negative integer", key);
  }
  if (!state.contains("buffer") || !state["buffer"].is_array()) return "'buffer' must be an array";
  for (const auto& d : state["buffer"]) {
    if (!d.is_array() || d.size() != 3 || !integer(d[0]) || !integer(d[1]) || !integer(d[2]))
      return "'buffer' entries must be [shard, begin, length] of non-negative integers";
  }
  return "";
}

void TokenLoader::restore(const nlohmann::json& state) {
  const std::string problem = state_problem(state);
  check(problem.empty(), "data loader: cannot restore the saved state: {}", problem);
  const nlohmann::json now = fingerprint();
  const nlohmann::json& saved = state.at("config");
  for (const auto& [key, value] : now.items())
    check(saved.contains(key) && saved[key] == value,
          "data loader: cannot restore a state saved with a different {}: saved {}, now {}", key,
          saved.contains(key) ? saved[key].dump() : "nothing", value.dump());
  start_epoch(state.at("epoch").get<uint64_t>());
  cursor_ = state.at("cursor").get<size_t>();
  position_ = state.at("position").get<size_t>();
  documents_ = state.at("documents").get<uint64_t>();
  check(cursor_ < order_.size(), "data loader: saved shard cursor {} is out of range", cursor_);
  buffer_.clear();
  for (const auto& doc : state.at("buffer")) {
    Doc d{doc.at(0).get<size_t>(), doc.at(1).get<size_t>(), doc.at(2).get<size_t>()};
    check(d.shard < shards_.size() && d.begin + d.length <= shards_[d.shard].size(),
          "data loader: saved document [{}, +{}) lies outside shard {}", d.begin, d.length,
          d.shard);
    buffer_.push_back(d);
  }
}

}  // namespace lmtrain
