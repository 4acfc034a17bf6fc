"""The corpus builder's checks that need no download, and its promise not to import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pollinate_runtime import corpora


@pytest.mark.parametrize(("name", "message"), [
    ("wikipedia", "unknown corpus 'wikipedia': expected bible, shakespeare, python-docs or "
                  "fortunes-<category>"),
    ("fortunes-miscellaneous", "corpus 'fortunes-miscellaneous' is reserved for general_heldout"),
])
def test_bad_corpus_names_fail_before_any_download(tmp_path: Path, name, message):
    with pytest.raises(corpora.CorpusError, match=message):
        corpora.site_corpus(name, cache_dir=tmp_path)
    assert not (tmp_path / "_downloads").exists()


def test_a_failed_download_names_the_package_and_the_command(tmp_path: Path):
    with pytest.raises(corpora.CorpusError,
                       match=r"cannot fetch Debian package no-such-package-pollinate: "
                             r"`apt-get .*download no-such-package-pollinate` exited"):
        corpora._fetch_deb("no-such-package-pollinate", tmp_path)
    assert corpora.fetch_report(tmp_path) == {}


@pytest.mark.slow  # builds a corpus in a process
def test_a_cached_corpus_is_reused_without_fetching(tmp_path: Path):
    built = tmp_path / "bible"
    built.mkdir()
    (built / "corpus.json").write_text('{"max_chars": 1000}')
    assert corpora.site_corpus("bible", max_chars=1000, cache_dir=tmp_path) == built


def test_the_corpus_module_does_not_import_torch():
    code = "import sys, pollinate_runtime.corpora; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("text", "expected"), [
    ("Title\n\n" + "word " * 100, "Title\n\n" + "word " * 8),       # a long paragraph: cut inside it
    ("one.\n\ntwo.\n\n" + "x" * 100, "one.\n\ntwo."),
    ("First sentence. " * 10, "First sentence. " * 3),
])
def test_a_head_is_cut_at_the_latest_boundary_not_shrunk_to_a_title(text: str, expected: str) -> None:
    head = corpora._head_paragraphs(text, 50)
    assert len(head) <= 50
    assert head.strip() == expected.strip()
