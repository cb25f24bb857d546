#include <filesystem>

#include "backend/factory.h"
#include "cli/commands.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"
#include "train/run_dir.h"

namespace lmtrain {

CheckpointModel open_checkpoint_model(const std::string& path, const std::string& backend,
                                      int batch) {
  const std::string dir = resolve_run_checkpoint(path);
  const auto meta = read_checkpoint_meta(dir);
  CheckpointModel m;
  m.config = parse_config(meta["config"], dir + "/meta.json");
  m.backend =
      backend.empty()
          ? with_context(path + ": the checkpoint's run.backend (--backend chooses another)",
                         [&] { return make_backend(m.config.run.backend, m.config.run.dtype); })
          : with_context("--backend", [&] { return make_backend(backend, m.config.run.dtype); });
  m.tokenizer_path = (std::filesystem::path(dir) / "tokenizer.json").string();
  m.tokenizer = std::make_unique<Tokenizer>(Tokenizer::load(m.tokenizer_path));
  const int vocab =
      m.config.model.vocab_size ? m.config.model.vocab_size : m.tokenizer->vocab_size();
  const GptShape shape = GptShape::from(m.config.model, vocab);
  check(m.tokenizer->vocab_size() <= vocab,
        "{}/meta.json: model.vocab_size {} is smaller than its tokenizer.json's {} tokens", dir,
        vocab, m.tokenizer->vocab_size());
  if (!m.config.model.vocab_size) {  // the vocabulary is the tokenizer's: the weights must agree
    const std::string weights = (std::filesystem::path(dir) / "model.safetensors").string();
    const SafetensorsFile file = SafetensorsFile::open(weights);
    const SafeTensorInfo& wte = file.info("transformer.wte.weight");
    check(wte.shape.size() == 2 && wte.shape[0] == shape.padded_vocab,
          "{}/tokenizer.json: {} tokens ({} rows padded), but {} holds {} token embeddings: not "
          "the tokenizer this model was trained with",
          dir, vocab, shape.padded_vocab, weights, wte.shape.empty() ? 0 : wte.shape[0]);
  }
  m.model =
      std::make_unique<Gpt>(*m.backend, shape, batch > 0 ? batch : m.config.batch.device_batch);
  load_model_weights(dir, *m.model);
  return m;
}

}  // namespace lmtrain
