"""Fixtures for the training tests (the tiny model folder itself comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pollinate_runtime.train.model import LoadedModel, load_model
from tiny_lm import (
    CPU,
    SITE_MODULES,
    TINY_LORA,
    docstring_corpus,
)


@pytest.fixture(scope="session")
def site_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site's private data: plain text of the site domain, one paragraph per document."""
    folder = tmp_path_factory.mktemp("site-data")
    (folder / "notes.txt").write_text("\n\n".join(docstring_corpus(SITE_MODULES)) + "\n")
    return folder


@pytest.fixture
def tiny_lora(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model with a fresh LoRA adapter (r=4 on q_proj, v_proj) on the CPU in fp32."""
    return load_model(str(tiny_model_dir), TINY_LORA, CPU)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model conversions and downloads land in the test's own folder, not ~/.cache/pollinate."""
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path / "pollinate-cache"))
