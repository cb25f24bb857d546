// cuDNN fused SDPA for the bf16 attention (interface and semantics in attention_cudnn.h).
//
// One cuDNN graph per (B, T, H, Hkv, D, window, forward/backward), built on first use and kept:
// building one takes tens of milliseconds (heuristics, kernel selection), executing it only binds
// the pointers. Shapes cuDNN rejects are remembered too, so the fallback costs nothing after the
// first call.
//
// The mapping onto cuDNN's SDPA:
//   - layouts: cuDNN's logical dims are (B, heads, T, D); our row-major (B, T, heads, D) buffers
//     are those dims with strides (T*heads*D, D, heads*D, 1) ("BSHD"). GQA is K/V with Hkv heads.
//   - mask: diagonal band aligned top-left, right bound 0 (causal). cuDNN keeps key j for query i
//     when j + left_bound > i, i.e. j >= i - left_bound + 1; our window keeps j >= i - window, so
//     left_bound = window + 1 (no left bound when window >= T - 1: every causal key is in).
//   - lse: the forward's Stats output, f32 (B, H, T, 1) with strides (H*T, T, 1, 1), natural-log
//     max + log(sum exp(s - max)) of the scaled scores = our lse (B, H, T); the backward reads it.
//   - scale 1/sqrt(D); I/O bf16, intermediates and compute f32.
#include "backend/cuda/attention_cudnn.h"

#include <spdlog/spdlog.h>

#include <cstdint>
#include <string>

#include "backend/cuda/cudnn_common.h"
#include "core/error.h"

#ifdef LMTRAIN_HAVE_CUDNN
#include <cmath>
#include <map>
#include <tuple>
#include <unordered_map>

// The library handle the frontend's dynamic-loading shim resolves cuDNN's symbols from (one
// definition for the program; cudnn_common.h's CudnnHandle sets it).
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}
#endif

namespace lmtrain::cuda {

#ifdef LMTRAIN_HAVE_CUDNN

namespace {

enum class Mode { off, deterministic, nondeterministic };

// LMTRAIN_CUDNN_ATTENTION: unset, "1" or "deterministic": on, deterministic backward;
// "nondeterministic": on, cuDNN's default backward (dq accumulated with fp32 atomics);
// "0" or "off": never (our own kernel only).
Mode mode_from_env() {
  return env_mode("LMTRAIN_CUDNN_ATTENTION", Mode::deterministic,
                  {{"1", Mode::deterministic},
                   {"deterministic", Mode::deterministic},
                   {"nondeterministic", Mode::nondeterministic},
                   {"0", Mode::off},
                   {"off", Mode::off}});
}

// Tensor uids of the variant packs.
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kdO, kdQ, kdK, kdV };

// (B, heads, T, D) dims over our (B, T, heads, D) memory, tokens `pitch` elements apart (0:
// dense).
std::vector<int64_t> bshd_stride(const AttentionShape& s, int heads, int64_t pitch) {
  const int64_t P = pitch ? pitch : int64_t(heads) * s.D;
  return {s.T * P, s.D, P, 1};
}

std::shared_ptr<fe::graph::Tensor_attributes> bshd(fe::graph::Graph& g, const char* name,
                                                   int64_t uid, const AttentionShape& s, int heads,
                                                   int64_t pitch) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_data_type(fe::DataType_t::BFLOAT16)
                      .set_dim({s.B, heads, s.T, s.D})
                      .set_stride(bshd_stride(s, heads, pitch)));
}

void set_bshd_output(const std::shared_ptr<fe::graph::Tensor_attributes>& t, int64_t uid,
                     const AttentionShape& s, int heads, int64_t pitch) {
  t->set_output(true)
      .set_uid(uid)
      .set_data_type(fe::DataType_t::BFLOAT16)
      .set_dim({s.B, heads, s.T, s.D})
      .set_stride(bshd_stride(s, heads, pitch));
}

// lse / Stats: (B, H, T, 1) f32, contiguous like our (B, H, T).
void set_stats(const std::shared_ptr<fe::graph::Tensor_attributes>& t, const AttentionShape& s) {
  const int64_t B = s.B, T = s.T, H = s.H;
  t->set_uid(kStats)
      .set_data_type(fe::DataType_t::FLOAT)
      .set_dim({B, H, T, 1})
      .set_stride({H * T, T, 1, 1});
}

bool causal_only(const AttentionShape& s) { return s.window >= s.T - 1; }

}  // namespace

struct CudnnAttention::Impl {
  using Plan = CudnnPlan;
  // B, T, H, Hkv, D, window, pitches, backward
  using Key = std::tuple<int, int, int, int, int, int, AttentionPitches, bool>;

  // Declared before the plans: destroyed after them, whose cuDNN descriptors it made.
  std::unique_ptr<CudnnHandle> handle;
  bool deterministic = true;
  std::map<Key, Plan> plans;
  bool warned_misaligned = false;

  // The eight tensors' pitches: the name, whether it has a query's heads (else a key's), and
  // whether it is a gradient (which the forward graph does not have).
  struct PitchField {
    const char* name;
    int64_t AttentionPitches::*pitch;
    bool query_heads, gradient;
  };
  static constexpr PitchField kPitchFields[] = {
      {"q", &AttentionPitches::q, true, false},   {"k", &AttentionPitches::k, false, false},
      {"v", &AttentionPitches::v, false, false},  {"out", &AttentionPitches::out, true, false},
      {"dq", &AttentionPitches::dq, true, true},  {"dk", &AttentionPitches::dk, false, true},
      {"dv", &AttentionPitches::dv, false, true}, {"dout", &AttentionPitches::dout, true, true}};

  // The pitches of the tensors a direction uses, a dense one (heads * D) as 0: dense calls share
  // the graphs attention_scratch_bytes builds for dense tensors, and the forward graph, which
  // has no gradients, is not split by theirs.
  static AttentionPitches bands(const AttentionShape& s, bool backward) {
    AttentionPitches pitch = s.pitch;
    for (const PitchField& f : kPitchFields) {
      int64_t& one = pitch.*f.pitch;
      if ((f.gradient && !backward) || one == int64_t(f.query_heads ? s.H : s.Hkv) * s.D) one = 0;
    }
    return pitch;
  }

  // The shape, and the pitches of the tensors that are bands.
  static std::string describe(const AttentionShape& s, bool backward) {
    const AttentionPitches p = bands(s, backward);
    std::string banded;
    for (const PitchField& f : kPitchFields)
      if (const int64_t pitch = p.*f.pitch)
        banded += fmt::format("{}{}={}", banded.empty() ? ", bands " : " ", f.name, pitch);
    return fmt::format("{} B={} T={} H={} Hkv={} D={} window={}{}",
                       backward ? "backward" : "forward", s.B, s.T, s.H, s.Hkv, s.D, s.window,
                       banded);
  }

  // The plan, or none (logged, the shape then runs on the own kernel) when a step of building
  // it fails.
  Plan build(const std::shared_ptr<fe::graph::Graph>& g, const AttentionShape& s, bool backward) {
    Plan plan;
    // Heuristics mode A alone: a shape it has no engine for runs on the own kernel.
    const std::string why = build_cudnn_plan(g, handle->get(), {fe::HeurMode_t::A},
                                             /*deterministic_only=*/false, plan);
    if (!why.empty())
      spdlog::warn("cuDNN attention {}: {}; using the own attention kernel for it{}",
                   describe(s, backward), why, hint(backward));
    return plan;
  }

  // Not every GPU and cuDNN version has a deterministic backward for every shape.
  std::string hint(bool backward) const {
    if (!backward || !deterministic) return "";
    return " (LMTRAIN_CUDNN_ATTENTION=nondeterministic may run it on cuDNN)";
  }

  std::shared_ptr<fe::graph::Graph> new_graph() {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
  }

  Plan build_forward(const AttentionShape& s) {
    auto g = new_graph();
    auto q = bshd(*g, "q", kQ, s, s.H, s.pitch.q);
    auto k = bshd(*g, "k", kK, s, s.Hkv, s.pitch.k);
    auto v = bshd(*g, "v", kV, s, s.Hkv, s.pitch.v);
    auto opts = fe::graph::SDPA_attributes()
                    .set_name("lmtrain_attention_forward")
                    .set_generate_stats(true)
                    .set_attn_scale(1.f / std::sqrt(float(s.D)))
                    .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                    .set_diagonal_band_right_bound(0);
    if (!causal_only(s)) opts.set_diagonal_band_left_bound(s.window + 1);
    auto [o, stats] = g->sdpa(q, k, v, opts);
    set_bshd_output(o, kO, s, s.H, s.pitch.out);
    stats->set_output(true);
    set_stats(stats, s);
    return build(g, s, false);
  }

  Plan build_backward(const AttentionShape& s) {
    auto g = new_graph();
    auto q = bshd(*g, "q", kQ, s, s.H, s.pitch.q);
    auto k = bshd(*g, "k", kK, s, s.Hkv, s.pitch.k);
    auto v = bshd(*g, "v", kV, s, s.Hkv, s.pitch.v);
    auto o = bshd(*g, "o", kO, s, s.H, s.pitch.out);
    auto dout = bshd(*g, "dout", kdO, s, s.H, s.pitch.dout);
    auto stats = g->tensor(fe::graph::Tensor_attributes().set_name("lse"));
    set_stats(stats, s);
    auto opts = fe::graph::SDPA_backward_attributes()
                    .set_name("lmtrain_attention_backward")
                    .set_attn_scale(1.f / std::sqrt(float(s.D)))
                    .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                    .set_diagonal_band_right_bound(0)
                    .set_deterministic_algorithm(deterministic);
    if (!causal_only(s)) opts.set_diagonal_band_left_bound(s.window + 1);
    auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, opts);
    set_bshd_output(dq, kdQ, s, s.H, s.pitch.dq);
    set_bshd_output(dk, kdK, s, s.Hkv, s.pitch.dk);
    set_bshd_output(dv, kdV, s, s.Hkv, s.pitch.dv);
    return build(g, s, true);
  }

  const Plan& plan(const AttentionShape& s, bool backward) {
    // Every window >= T - 1 is the same causal graph.
    const int window = causal_only(s) ? -1 : s.window;
    const Key key{s.B, s.T, s.H, s.Hkv, s.D, window, bands(s, backward), backward};
    auto it = plans.find(key);
    if (it == plans.end()) {
      Plan p = backward ? build_backward(s) : build_forward(s);
      if (p.graph)
        spdlog::debug("cuDNN attention {}: graph built, workspace {} bytes", describe(s, backward),
                      p.workspace);
      it = plans.emplace(key, std::move(p)).first;
    }
    return it->second;
  }

  bool run(const AttentionShape& s, bool backward, std::unordered_map<int64_t, void*>& pack,
           const Workspace& workspace) {
    if (!aligned_16(pack)) {
      if (!warned_misaligned)
        spdlog::warn("cuDNN attention {}: a tensor is not 16-byte aligned; using the own kernel",
                     describe(s, backward));
      warned_misaligned = true;
      return false;
    }
    const Plan& p = plan(s, backward);
    if (!p.graph) return false;
    void* ws = p.workspace > 0 ? workspace(size_t(p.workspace)) : nullptr;
    fe::error_t status = p.graph->execute(handle->get(), pack, ws);
    if (!status.is_good())
      fail("cuDNN attention {}: execute failed: {}", describe(s, backward), status.get_message());
    return true;
  }
};

std::unique_ptr<CudnnAttention> CudnnAttention::create(cudaStream_t stream) {
  const Mode mode = mode_from_env();
  if (mode == Mode::off) {
    spdlog::info(
        "cuDNN attention off (LMTRAIN_CUDNN_ATTENTION): bf16 attention uses the own kernel");
    return nullptr;
  }
  auto impl = std::make_unique<Impl>();
  impl->deterministic = mode == Mode::deterministic;
  try {
    impl->handle = std::make_unique<CudnnHandle>(stream);
  } catch (const std::exception& e) {
    spdlog::warn("cuDNN attention unavailable ({}): bf16 attention uses the own kernel", e.what());
    return nullptr;
  }
  spdlog::info("cuDNN attention: cuDNN {} at run time (headers {}), {} backward",
               impl->handle->version(), CUDNN_VERSION,
               impl->deterministic ? "deterministic" : "nondeterministic");
  return std::unique_ptr<CudnnAttention>(new CudnnAttention(std::move(impl)));
}

bool CudnnAttention::forward(void* out, float* lse, const void* q, const void* k, const void* v,
                             const AttentionShape& s, const Workspace& workspace) {
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<void*>(q)},
                                          {kK, const_cast<void*>(k)},
                                          {kV, const_cast<void*>(v)},
                                          {kO, out},
                                          {kStats, lse}};
  return impl_->run(s, false, pack, workspace);
}

bool CudnnAttention::backward(void* dq, void* dk, void* dv, const void* dout, const void* q,
                              const void* k, const void* v, const void* out, const float* lse,
                              const AttentionShape& s, const Workspace& workspace) {
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<void*>(q)},
                                          {kK, const_cast<void*>(k)},
                                          {kV, const_cast<void*>(v)},
                                          {kO, const_cast<void*>(out)},
                                          {kdO, const_cast<void*>(dout)},
                                          {kStats, const_cast<float*>(lse)},
                                          {kdQ, dq},
                                          {kdK, dk},
                                          {kdV, dv}};
  return impl_->run(s, true, pack, workspace);
}

int64_t CudnnAttention::workspace_bytes(const AttentionShape& s, bool backward) {
  const Impl::Plan& p = impl_->plan(s, backward);
  return p.graph ? p.workspace : -1;
}

bool CudnnAttention::deterministic() const { return impl_->deterministic; }

#else  // no cuDNN at build time: the own kernel does everything.

struct CudnnAttention::Impl {};

std::unique_ptr<CudnnAttention> CudnnAttention::create(cudaStream_t) { return nullptr; }

bool CudnnAttention::forward(void*, float*, const void*, const void*, const void*,
                             const AttentionShape&, const Workspace&) {
  return false;
}

bool CudnnAttention::backward(void*, void*, void*, const void*, const void*, const void*,
                              const void*, const void*, const float*, const AttentionShape&,
                              const Workspace&) {
  return false;
}

int64_t CudnnAttention::workspace_bytes(const AttentionShape&, bool) { return -1; }

bool CudnnAttention::deterministic() const { return true; }

#endif

CudnnAttention::CudnnAttention(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudnnAttention::~CudnnAttention() = default;

}  // namespace lmtrain::cuda
