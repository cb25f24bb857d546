#include "train/trainer.h"

#include <cblas.h>
#include <omp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string_view>

#include "backend/factory.h"
#include "backend/timed_backend.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "dist/communicator.h"
#include "dist/env.h"
#include "io/run_lock.h"
#include "model/generator.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"
#include "train/metrics.h"
#include "train/op_profile.h"
#include "train/plan.h"
#include "train/rank_agreement.h"
#include "train/run_dir.h"

namespace lmtrain {

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_stop_signal{0};

extern "C" void on_stop_signal(int signal) { g_stop_signal = signal; }

// The stop signal every rank acts on, from each rank's own (one per rank, summed over ranks,
// from `first`): the lowest rank's that got one, so that all ranks exit with the same code.
int agreed_signal(const std::vector<float>& per_rank, size_t first) {
  for (size_t i = first; i < per_rank.size(); ++i)
    if (per_rank[i] > 0) return int(per_rank[i]);
  return 0;
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Reads every training token id once, the ranks splitting the tokens: an id outside the
// vocabulary deep in the data would otherwise fail the run when it got there, hours in.
void check_train_ids(const std::vector<std::string>& shards, int32_t vocab, int rank, int world) {
  const auto started = Clock::now();
  const IdCheck done = check_shard_ids(shards, vocab, rank, world);
  spdlog::info(
      "checked the training token ids against the vocabulary of {}: {} tokens in {} of {} "
      "shards{} in {:.2f} s{}",
      vocab, done.tokens, done.shards, shards.size(),
      world > 1 ? fmt::format(" (rank {}'s share)", rank) : "", seconds_since(started),
      done.skipped
          ? fmt::format(" ({} uint16 shards skipped: no id of theirs can reach it)", done.skipped)
          : "");
}

std::string sample_text(const Gpt& model, const Tokenizer& tokenizer, const EvalConfig& e,
                        uint64_t seed) {
  std::vector<int32_t> prompt = {tokenizer.bos_id()};
  auto encoded = tokenizer.encode(e.sample_prompt);
  prompt.insert(prompt.end(), encoded.begin(), encoded.end());
  Generator generator(model);
  const Generation generation = generator.generate(
      prompt, {e.sample_tokens, e.temperature, e.top_k, seed, tokenizer.vocab_size()},
      tokenizer.bos_id());
  return e.sample_prompt + tokenizer.decode(generation.tokens);
}

// Whether UTF-8 `text` holds a control character (C0, DEL, C1) or one of Unicode's line
// separators and bidirectional overrides (U+2028..U+202E, U+2066..U+2069), which would garble or
// disguise every line and listing that shows it.
bool has_control(std::string_view text) {
  for (size_t i = 0; i < text.size(); ++i) {
    const auto byte = [&](size_t k) { return i + k < text.size() ? uint8_t(text[i + k]) : 0; };
    if (byte(0) < 0x20 || byte(0) == 0x7F) return true;
    if (byte(0) == 0xC2 && byte(1) >= 0x80 && byte(1) <= 0x9F) return true;  // U+0080..U+009F
    if (byte(0) == 0xE2 && ((byte(1) == 0x80 && byte(2) >= 0xA8 && byte(2) <= 0xAE) ||
                            (byte(1) == 0x81 && byte(2) >= 0xA6 && byte(2) <= 0xA9)))
      return true;
  }
  return false;
}

// run.name names a directory inside run.out_dir. Checked by train alone, so that a checkpoint's
// saved config stays readable by eval and sample whatever its name.
void check_run_name(const std::string& run_name, const std::string& source) {
  check(!has_control(run_name), "{}: run.name: expected a name without control characters", source);
  const fs::path name(run_name);
  check(name.is_relative() &&
            std::none_of(name.begin(), name.end(),
                         [](const fs::path& part) { return part == ".." || part == "."; }),
        "{}: run.name: expected a relative name inside run.out_dir (no '..' or '.'), got '{}'",
        source, run_name);
}

}  // namespace

int train(const TrainOptions& options) {
  Config config = load_config(options.config_path, options.overrides);
  const nlohmann::json resolved = to_json(config);
  // Errors about keys name the config, or the --set that wrote the key.
  const config::Source source{options.config_path, options.overrides};
  auto at_key = [&](std::string_view key) { return fmt::format("{}: {}", source.at(key), key); };
  const std::string at_run_dir =
      source.at({"run.out_dir", "run.name"}) + ": run.out_dir and run.name";
  check_run_name(config.run.name, source.at("run.name"));
  const std::string run_dir = (fs::path(config.run.out_dir) / config.run.name).string();
  const std::string ckpt_parent = (fs::path(run_dir) / "ckpt").string();
  check(!(options.resume && !options.init_from.empty()),
        "train: use --resume or --init-from, not both");
  check(!(options.resume && options.overwrite), "train: use --resume or --overwrite, not both");
  // A new run never replaces an earlier one unasked: its checkpoints and metrics would be lost.
  // Checked now, before anything is built, and again under the run directory's lock.
  auto refuse_earlier_run = [&] {
    if (options.resume || options.overwrite) return;
    const RunDirState state = run_dir_state(run_dir);
    check(!state.earlier_run(),
          "train: {} holds an earlier run: {}start another with --set run.name=NAME, or replace "
          "it with --overwrite{}",
          run_dir, state.checkpoints ? "continue it with --resume, " : "",
          replaced_run_hint(run_dir));
  };
  std::error_code ec;
  check(!fs::exists(ckpt_parent, ec) || fs::is_directory(ckpt_parent, ec),
        "train: {}: expected the run's checkpoint directory, found a file", ckpt_parent);
  check_replaced_run_dir(run_dir);
  // A run holding the directory (say, before its first checkpoint) is the reason to give, not
  // the missing checkpoint or the earlier run's files it is writing. The lock itself is taken
  // after start-up, so this is a courtesy; the lock decides.
  with_context(at_run_dir, [&] { RunLock::refuse_if_held(run_dir); });
  // A set-aside by --overwrite killed halfway: its files go back before anything looks for them
  // (the checkpoint to resume, the earlier run). The lead rank alone moves them; another rank
  // that looks first may not find them, and the run started again does.
  const dist::RankInfo ranks = dist::read_rank_info();
  if (ranks.rank == 0 && undo_unfinished_set_aside(run_dir))
    spdlog::warn(
        "{}: moved back the files of a run that --overwrite was setting aside when it "
        "was killed",
        run_dir);
  refuse_earlier_run();

  // Resuming: the checkpoint's model, batch and data must be the ones configured now.
  std::string resume_dir;
  nlohmann::json resume_meta;
  if (options.resume) {
    resume_dir = resolve_run_checkpoint(ckpt_parent);
    resume_meta = read_checkpoint_meta(resume_dir);
    const nlohmann::json& saved = resume_meta["config"];
    for (const char* section : {"model", "batch", "data"}) {
      const auto patch = nlohmann::json::diff(saved[section], resolved[section]);
      if (patch.empty()) continue;
      const nlohmann::json::json_pointer where("/" + std::string(section) +
                                               patch[0]["path"].get<std::string>());
      std::string key = where.to_string().substr(1);
      std::replace(key.begin(), key.end(), '/', '.');
      auto show = [&](const nlohmann::json& c) {
        return c.contains(where) ? c.at(where).dump() : "absent";
      };
      fail("{}/meta.json: {} is {} in the checkpoint but {} now; a resumed run needs the same {}",
           resume_dir, key, show(saved), show(resolved), section);
    }
  }

  if (config.run.threads > 0) {
    omp_set_num_threads(config.run.threads);
    openblas_set_num_threads(config.run.threads);
  }
  std::unique_ptr<Backend> backend = with_context(at_key("run.backend"), [&] {
    return make_backend(config.run.backend, config.run.dtype, ranks.local_rank);
  });
  auto comm = dist::make_communicator(ranks, *backend, dist::rendezvous_timeout());
  const int rank = comm->rank(), world = comm->world_size();
  const bool lead = rank == 0;  // prints, writes metrics and samples
  if (!lead) spdlog::set_level(spdlog::level::warn);
  // run.profile_steps: the model and the optimizer run on a TimedBackend around the backend;
  // the communicator, the memory report and the MFU's peak keep the backend itself. Without
  // profiling nothing is wrapped.
  std::unique_ptr<TimedBackend> timed;
  if (config.run.profile_steps > 0) timed = std::make_unique<TimedBackend>(*backend);
  Backend& ops = timed ? static_cast<Backend&>(*timed) : *backend;

  // What the data keys name is read now; an error there names the key as well as the config.
  Tokenizer tokenizer = with_context(at_key("data.tokenizer"),
                                     [&] { return Tokenizer::load(config.data.tokenizer); });
  const int vocab = config.model.vocab_size ? config.model.vocab_size : tokenizer.vocab_size();
  check(tokenizer.vocab_size() <= vocab,
        "{}: model.vocab_size: {} is smaller than the tokenizer's {}",
        source.at({"model.vocab_size", "data.tokenizer"}), vocab, tokenizer.vocab_size());
  const GptShape shape = GptShape::from(config.model, vocab);
  const TrainingPlan plan = make_plan(config, shape, world, source);
  const int B = config.batch.device_batch, T = shape.seq_len, N = plan.num_iterations;
  if (options.resume) {
    const int saved_step = resume_meta["step"].get<int>();
    check(saved_step <= N, "{}/meta.json: step {} is past this run's horizon of {} steps",
          resume_dir, saved_step, N);
  }

  Gpt model(ops, shape, B, GptOptions::from(config.run));
  Optimizer optimizer(model, config.optim, double(plan.batch_tokens), N, *comm);
  // The shards are read through once here (every training id, every validation window, the
  // tokenizer they were made with), so that bad data fails the run now, not hours in.
  auto check_meta = [&](const std::vector<std::string>& shards) {
    check_shard_meta(shards.front(), config.data.tokenizer, tokenizer.vocab_size(),
                     tokenizer.bos_id());
  };
  TokenLoader loader = with_context(at_key("data.train"), [&] {
    const auto shards = list_shards(config.data.train, "train");
    check_meta(shards);
    check_train_ids(shards, shape.vocab, rank, world);
    return TokenLoader({shards, parse_packing(config.data.packing), B, T, rank, world,
                        config.run.seed, tokenizer.bos_id(), true, shape.vocab});
  });
  // Validation and the samples come last at the latest: what would fail them is checked now,
  // before the run has trained.
  const auto val_shards = with_context(at_key("data.val"), [&] {
    const auto shards = list_shards(config.data.val, "val");
    check_meta(shards);
    if (config.eval.every >= 0) {
      const EvalBatches batches = check_eval_data(shards, B, T, config.eval.tokens / world, rank,
                                                  world, tokenizer.bos_id(), shape.vocab);
      if (batches.capped && rank == 0)
        spdlog::warn(
            "eval.tokens {}: the validation shards hold {} tokens for {} rank(s) in "
            "batches of {} x {}; each evaluation reads those",
            config.eval.tokens, batches.count * B * T * world, world, B, T);
    }
    return shards;
  });
  const size_t prompt_tokens = 1 + tokenizer.encode(config.eval.sample_prompt).size();  // + BOS
  check(prompt_tokens < size_t(T),
        "{}: eval.sample_prompt: {} tokens with the BOS, but samples need fewer than "
        "model.sequence_len {}",
        source.at({"eval.sample_prompt", "model.sequence_len", "data.tokenizer"}), prompt_tokens,
        T);
  // The few values the ranks share each step: four sums, or a loss and one value per rank.
  const int64_t num_scalars = std::max(4, world + 1);
  Buffer scalar_memory = backend->allocate(size_t(num_scalars) * sizeof(float));
  const Tensor scalars = scalar_memory.tensor({num_scalars}, DType::f32);
  // An error that unwinds the run ends this rank's collectives in flight before the buffers
  // above are freed (freeing synchronizes the device, which would wait for them).
  const dist::AbortOnError abort_on_error(*comm);

  LoopState loop;
  double trained_seconds = 0;
  if (options.resume) {
    load_model_weights(resume_dir, model);
    load_optimizer_state(resume_dir, optimizer);
    loop.step = resume_meta["step"].get<int>();
    loader.restore(checkpoint_loader_state(resume_dir, rank, world, int64_t(B) * T));
    trained_seconds = resume_meta["extra"].value("trained_seconds", 0.0);
    spdlog::info("resuming from {} at step {} ({} ranks, saved with {})", resume_dir, loop.step,
                 world, resume_meta.value("world_size", 1));
    if (loop.step == N) spdlog::info("the run is complete at step {}: nothing left to train", N);
  } else if (!options.init_from.empty()) {
    std::string dir = resolve_checkpoint(options.init_from);
    read_checkpoint_meta(dir);  // a checkpoint this version wrote, whole
    load_model_weights(dir, model);
    spdlog::info("initialised weights from {}", dir);
  } else {
    model.init_weights(config.run.seed);  // the same seed on every rank: the same weights
  }

  std::optional<MetricsLog> metrics;
  // Every rank has checked its share of the data and read what it needs (--init-from may name a
  // checkpoint of the run replaced): a run that any rank refused has written nothing.
  with_context("waiting for every rank's start-up checks", [&] { comm->barrier(); });
  // One training per run directory at a time: the lead rank holds its lock for the job, and
  // writes there only from now on. A run started beside this one may have written meanwhile.
  std::optional<RunLock> run_lock;
  if (lead) {
    with_context(at_run_dir, [&] { run_lock.emplace(run_dir); });
    refuse_earlier_run();
    if (options.overwrite && run_dir_state(run_dir).earlier_run()) {
      spdlog::warn(
          "--overwrite: the earlier run's checkpoints and metrics are in {} until this run saves "
          "its first checkpoint",
          set_aside_earlier_run(run_dir));
    } else if (const int removed = remove_unfinished(ckpt_parent)) {
      spdlog::info("{}: removed {} unfinished checkpoint directories of a run that was killed",
                   ckpt_parent, removed);
    }
    const std::string metrics_path = (fs::path(run_dir) / "metrics.jsonl").string();
    if (options.resume && resume_meta["extra"].contains("metrics_bytes")) {
      const int dropped = drop_records_after(metrics_path, resume_meta["extra"]["metrics_bytes"]);
      if (dropped > 0) {
        spdlog::info("{}: dropped the {} lines written after step {}'s checkpoint (redone now)",
                     metrics_path, dropped, loop.step);
      }
    }
    metrics.emplace(metrics_path);
  }
  spdlog::info("config:\n{}", resolved.dump(2));
  ParamCounts counts = count_params(model.table());
  spdlog::info("model: depth {} width {} heads {} (kv {}) head_dim {} T {} vocab {} ({} padded)",
               shape.depth, shape.width, shape.n_head, shape.n_kv_head, shape.head_dim, T,
               shape.vocab, shape.padded_vocab);
  spdlog::info("parameters: {} total, {} matrices, {} lm_head, {} wte, {} value_embeds, {} scalars",
               counts.total, counts.transformer_matrices, counts.lm_head, counts.wte,
               counts.value_embeds, counts.scalars);
  spdlog::info("backend: {} | ranks: {} ({})\n{}", backend->name(), world, comm->name(),
               plan.describe());

  const double peak = peak_flops(*backend);
  // The run --overwrite replaced goes once this run has a checkpoint or has finished.
  auto discard_replaced = [&](const char* why) {
    // (A new run never gets here with one: refuse_earlier_run counts it as an earlier run.)
    if ((options.overwrite || options.resume) && discard_replaced_run(run_dir))
      spdlog::info("deleted {}, the run --overwrite replaced: this run{}",
                   replaced_run_dir(run_dir), why);
  };
  // Saves the state after `completed` optimizer steps (every rank takes part).
  // `evaluated`: the evaluation at `completed` has run (the final checkpoint's case), so a run
  // resumed from it does not repeat it.
  const bool resumed_evaluated = options.resume && resume_meta["extra"].value("evaluated", false);
  // The newest checkpoint's step, and whether it was saved after that step's evaluation.
  int saved_step = options.resume ? loop.step : -1;
  bool saved_evaluated = resumed_evaluated;
  auto save = [&](int completed, bool evaluated = false) {
    saved_step = completed;
    saved_evaluated = evaluated;
    loop.step = completed;
    loop.loader = loader.state();
    loop.extra = {{"trained_seconds", trained_seconds}, {"evaluated", evaluated}};
    if (lead) loop.extra["metrics_bytes"] = metrics->bytes();
    std::string dir = save_checkpoint(ckpt_parent, resolved, model, &optimizer, loop,
                                      config.data.tokenizer, *comm);
    spdlog::info("saved checkpoint {}", dir);
    if (lead) discard_replaced(" has a checkpoint");
  };

  // The op profile of steps [profile_start, profile_start + profile_steps), 1-based: written
  // once the window's last step is done, or with what was profiled when the run ends first.
  const ProfileWindow window{config.run.profile_start, config.run.profile_steps};
  auto profiled = [&](int step) {  // 0-based, as the loop counts
    return timed && step + 1 >= window.start && step + 1 < window.start + window.steps;
  };
  auto set_phase = [&](const char* phase) {
    if (timed) timed->set_phase(phase);
  };
  bool profile_written = false;
  auto write_profile = [&] {  // the lead rank's profile; the others time the same ops
    if (!timed || !lead || profile_written) return;
    profile_written = true;
    const size_t done = timed->profile().steps.size();
    if (done == 0) {
      spdlog::warn("op profile: no step of [{}, {}) ran; nothing to write", window.start,
                   window.start + window.steps);
      return;
    }
    if (int(done) < window.steps) {
      spdlog::warn("op profile: the run ended after {} of the {} profiled steps asked for", done,
                   window.steps);
    }
    const nlohmann::json report = op_profile_report(timed->profile(), window, backend->name());
    spdlog::info("{}", format_op_profile(report));
    const std::string path = (fs::path(run_dir) / "op_profile.json").string();
    std::ofstream file(path, std::ios::trunc);
    file << report.dump(2) << "\n";
    check(file.good(), "{}: cannot write the op profile", path);
    spdlog::info("op profile written to {}", path);
  };

  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  // A hangup (the terminal went away) stops the run too, unless it was ignored (nohup).
  if (std::signal(SIGHUP, on_stop_signal) == SIG_IGN) std::signal(SIGHUP, SIG_IGN);
  // A reader of the output that went away (a pager quit, a tee killed) fails the log's writes
  // instead of ending the run unsaved; training goes on, and SIGINT still stops it with a
  // checkpoint.
  std::signal(SIGPIPE, SIG_IGN);

  // A signal that arrives during an evaluation, a sample or a save (long, and outside the step's
  // agreement) is agreed on right after it, so the run stops there instead of a step later.
  auto agreed_stop = [&] {
    std::vector<float> flags(size_t(world), 0.f);
    flags[size_t(rank)] = float(g_stop_signal.load());
    all_reduce_sum(*comm, *backend, scalars, flags);
    return agreed_signal(flags, 0);
  };
  auto stop = [&](int signal, int completed, bool evaluated) {
    write_profile();
    if (saved_step != completed || (evaluated && !saved_evaluated)) save(completed, evaluated);
    spdlog::warn("stopped by signal {} after step {}; checkpoint saved", signal, completed);
    return 128 + signal;
  };

  std::vector<int32_t> inputs(size_t(B) * T), targets(size_t(B) * T);
  const auto& e = config.eval;
  const int first_step = loop.step;
  for (int step = loop.step; step <= N; ++step) {
    const bool last = step == N;
    const bool evaluated = step == first_step && resumed_evaluated;
    const bool evaluating =
        !evaluated && e.every >= 0 && ((e.every > 0 && step % e.every == 0) || last);
    const bool sampling =  // by the lead rank alone
        !evaluated && ((e.sample_every > 0 && step % e.sample_every == 0 && step > 0) || last);
    if (evaluating) {
      EvalResult r = evaluate(model, val_shards, tokenizer, e.tokens / world, rank, world);
      std::vector<float> sums = {float(r.nats), float(r.text_nats), float(r.bytes),
                                 float(r.tokens)};
      all_reduce_sum(*comm, *backend, scalars, sums);
      r = {sums[0], sums[1], sums[2], sums[3]};
      spdlog::info("step {}/{} | val loss {:.4f} | val bpb {:.4f}", step, N, r.loss(), r.bpb());
      if (lead) metrics->write({{"step", step}, {"val/loss", r.loss()}, {"val/bpb", r.bpb()}});
    }
    if (lead && sampling) {
      spdlog::info("sample: {}", sample_text(model, tokenizer, e, config.run.seed + step));
    }
    if (last) break;
    if (evaluating || sampling) {
      if (const int signal = agreed_stop()) return stop(signal, step, evaluating);
    }

    auto started = Clock::now();
    const bool profiling = profiled(step);
    if (profiling) timed->begin_step(step + 1);
    set_phase("zero_grads");
    model.zero_grads();
    double loss_sum = 0;
    for (int micro = 0; micro < plan.grad_accum; ++micro) {
      set_phase("forward");
      loader.next_batch(inputs, targets);
      Gpt::Loss loss = model.forward(inputs, targets, true, 1.0f / plan.grad_accum);
      stop_on_nonfinite_loss(*comm, *backend, scalars, loss.sum, step + 1, micro);
      loss_sum += loss.sum / std::max<int64_t>(loss.count, 1);
      // The last micro-step's gradients are the step's: reduce them while the backward runs.
      set_phase("backward");
      model.backward(micro + 1 == plan.grad_accum ? optimizer.reduce_as_ready()
                                                  : Gpt::GradsReady{});
    }
    const double lrm = lr_multiplier(step, N, config.schedule);
    backend->synchronize();
    const auto optimizer_started = Clock::now();
    set_phase("optimizer");
    nlohmann::json optim_metrics = optimizer.step(step, lrm, config.optim.grad_clip);
    backend->synchronize();
    const double optimizer_seconds = seconds_since(optimizer_started);
    // The mean loss over ranks, and whether any rank was asked to stop: all stop together.
    std::vector<float> shared(1 + size_t(world), 0.f);
    shared[0] = float(loss_sum / plan.grad_accum);
    shared[1 + size_t(rank)] = float(g_stop_signal.load());
    all_reduce_sum(*comm, *backend, scalars, shared);
    const double train_loss = world == 1 ? loss_sum / plan.grad_accum : shared[0] / world;
    const int stop_signal = agreed_signal(shared, 1);

    const double dt = seconds_since(started);
    trained_seconds += dt;
    if (profiling) timed->end_step(1e3 * dt);  // after dt: reading the times is not timed
    const double tokens_per_second = plan.batch_tokens / dt;
    const double mfu = peak > 0 ? plan.flops_per_token * tokens_per_second / (peak * world) : 0;
    const double eta = trained_seconds / (step + 1 - first_step) * (N - step - 1);
    const double grad_norm = optim_metrics["grad_norm"];
    if (step % config.log.every == 0 || step + 1 == N) {
      spdlog::info(
          "step {}/{} | loss {:.4f} | lrm {:.3f} | grad norm {:.3f} | {:.0f} tok/s | mfu {} | "
          "{} elapsed | eta {}",
          step + 1, N, train_loss, lrm, grad_norm, tokens_per_second,
          peak > 0 ? fmt::format("{:.1f}%", 100 * mfu) : "n/a", format_duration(trained_seconds),
          format_duration(eta));
    }
    if (lead) {
      nlohmann::json record = {{"step", step + 1},
                               {"train_loss", train_loss},
                               {"lr_multiplier", lrm},
                               {"tokens_per_second", tokens_per_second},
                               {"step_ms", 1e3 * dt},
                               {"optimizer_ms", 1e3 * optimizer_seconds},
                               {"mfu", peak > 0 ? nlohmann::json(mfu) : nlohmann::json(nullptr)}};
      record.update(optim_metrics);
      metrics->write(record);
    }
    if (profiling && step + 2 == window.start + window.steps) write_profile();

    if (stop_signal) return stop(stop_signal, step + 1, false);
    if (config.checkpoint.every > 0 && (step + 1) % config.checkpoint.every == 0 && step + 1 < N) {
      save(step + 1);
      if (const int signal = agreed_stop()) return stop(signal, step + 1, false);
    }
  }
  write_profile();
  // A signal during the last evaluation or sample: the run is complete, but it was asked to
  // stop, so it saves (whatever checkpoint.save_final says) and says so in its exit code.
  const int late_signal = agreed_stop();
  // A run resumed from its final checkpoint has that state saved already.
  const bool saved_final = saved_step == N && saved_evaluated;
  if ((config.checkpoint.save_final || late_signal) && !saved_final) save(N, true);
  if (lead) discard_replaced(" has finished");
  spdlog::info("peak {} memory: {:.1f} MiB", backend->name(), backend->peak_bytes() / 1048576.0);
  if (lead) metrics->write({{"step", N}, {"peak_memory_bytes", backend->peak_bytes()}});
  if (late_signal) {
    spdlog::warn("stopped by signal {} after the last step; checkpoint saved", late_signal);
    return 128 + late_signal;
  }
  return 0;
}

}  // namespace lmtrain
