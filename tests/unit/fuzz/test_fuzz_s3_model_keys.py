"""Base-model object keys listed from S3, whatever they hold: each lands inside the model's
folder and never on the cache's own files, or is refused naming the key."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pollinate_runtime.train.sources import PARTIAL_SUFFIX, S3_MANIFEST, ModelSourceError, model_file_path

FUZZ = settings.get_profile("pollinate-fuzz")
PREFIX = "models/smollm2/"
TARGET = Path("/cache/models/s3-0123456789abcdef")
# Segments built from what path tricks are made of, and anything else.
SEGMENTS = st.one_of(
    st.sampled_from(["", ".", "..", "...", "config.json", S3_MANIFEST, "x" + PARTIAL_SUFFIX,
                     "a\\b", "..\\..", "nul\0", "~", "x" * 256, "é" * 128]),
    st.text(min_size=0, max_size=12),
)


def inside(target: Path, relative: PurePosixPath) -> bool:
    resolved = Path(os.path.normpath(target.joinpath(*relative.parts)))
    return resolved != target and resolved.is_relative_to(target)


@settings(FUZZ, max_examples=300)
@given(st.lists(SEGMENTS, min_size=0, max_size=6).map("/".join))
@example("../../etc/cron.d/x")
@example("/etc/passwd")
@example("tokenizer/../../../x")
@example("a//b")
@example("")
@example("weights\\..\\..\\x")
def test_a_listed_key_lands_inside_the_model_folder_or_is_refused_by_name(rest: str) -> None:
    key = PREFIX + rest
    try:
        relative = model_file_path(key, PREFIX)
    except ModelSourceError as err:
        assert repr(key) in str(err) and "expected keys under" in str(err)
        return
    assert inside(TARGET, relative), (key, relative)
    assert relative.name != S3_MANIFEST and not relative.name.endswith(PARTIAL_SUFFIX)
    assert str(relative) == rest  # a key that is kept is kept as it is


@pytest.mark.parametrize("rest", ["config.json", "model.safetensors", "tokenizer/vocab.json",
                                  "a/b/c/d.bin", ".gitattributes", "v1.0..final/x"])
def test_ordinary_model_files_keep_their_names(rest: str) -> None:
    assert model_file_path(PREFIX + rest, PREFIX) == PurePosixPath(rest)
