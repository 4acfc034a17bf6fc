"""A site's data files, whatever they hold: read into documents, or a DataError that names the
file (and the line, when one line is at fault); never a raw exception from json, the codec or
the tokenizer, and never an error message that repeats a huge line."""

from __future__ import annotations

import itertools
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_json import json_values
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from pollinate_runtime.train.data import DataError, load_site_data, read_documents
from transformers import AutoTokenizer

FUZZ = settings.get_profile("pollinate-fuzz")
RECORD_KEYS = st.sampled_from(["text", "instruction", "input", "output"])
# A message may name the file, a line, a field and a short excerpt; not echo the input.
MAX_MESSAGE = 400
_numbering = itertools.count()


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    # Hypothesis runs many examples per test: one folder, a fresh file name for each.
    with tempfile.TemporaryDirectory(prefix="fuzz-site-data-") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir: Path) -> dict[bool, object]:
    """The tiny model's tokenizer with its chat template (True) and without one (False: instruction
    records use the plain layout)."""
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain.chat_template = None
    return {True: AutoTokenizer.from_pretrained(tiny_model_dir), False: plain}


def write(folder: Path, suffix: str, content: bytes) -> Path:
    path = folder / f"site-{next(_numbering)}{suffix}"
    path.write_bytes(content)
    return path


def read_or_data_error(path: Path, read=read_documents) -> None:
    """Read `path`; a DataError must name the file and, when it names a line of a JSONL file,
    that line must be at fault (and, unless the file is not UTF-8, no line before it)."""
    try:
        read(path)
    except DataError as err:
        message = str(err)
        event("DataError")
        assert str(path) in message, message
        assert len(message) <= len(str(path)) + MAX_MESSAGE, message[:1000]
        line = re.match(re.escape(str(path)) + r":(\d+): ", message)
        if line and path.suffix == ".jsonl":
            number = int(line.group(1))
            lines = path.read_bytes().split(b"\n")
            assert 1 <= number <= len(lines)
            with pytest.raises(DataError):
                read_documents(write(path.parent, ".jsonl", lines[number - 1]))
            if "expected UTF-8 text" not in message:  # the whole file is decoded first
                assert read_prefix(path.parent, lines[: number - 1]) in ("read", "no documents")
    else:
        event("read")


def read_prefix(folder: Path, lines: list[bytes]) -> str:
    try:
        read_documents(write(folder, ".jsonl", b"\n".join(lines)))
    except DataError as err:
        return "no documents" if "holds no documents" in str(err) else str(err)
    return "read"


def jsonl(lines: list) -> bytes:
    return b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8", "surrogatepass")) + b"\n"
                    for ln in lines)


# Records close to the accepted shapes: right keys, any values.
records = st.dictionaries(RECORD_KEYS, json_values(max_leaves=4), max_size=4)
# A line as a hostile or careless writer leaves it.
hostile_lines = st.one_of(
    records.map(json.dumps),
    records.map(lambda r: json.dumps(r)[: len(json.dumps(r)) // 2]),  # cut short
    json_values().map(json.dumps),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from(["[" * 100_000, '{"text": ' + "1" * 5000 + "}", '{"text": "\\ud800"}',
                     '{"text": NaN}', '{"' + "k" * 100_000 + '": 1}', "\x00", "\ufeff{}"]),
)


@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".txt"]))
@example(content=b"\xff\xfe\x00\x00", suffix=".jsonl")
@example(content=b"ok\n\xc3", suffix=".txt")
def test_any_bytes_are_read_or_a_data_error_naming_the_file(folder, content, suffix):
    read_or_data_error(write(folder, suffix, content))


@FUZZ
@given(lines=st.lists(hostile_lines, max_size=6))
@example(lines=["[" * 100_000])  # json's recursion limit
@example(lines=['{"text": ' + "1" * 5000 + "}"])  # Python's limit on digits in an int
@example(lines=['{"' + "k" * 100_000 + '": 1}'])  # a huge key in the error message
def test_malformed_json_lines_are_a_data_error_naming_file_and_line(folder, lines):
    read_or_data_error(write(folder, ".jsonl", jsonl(lines)))


record_texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30).filter(str.strip)


@FUZZ
@given(texts=st.lists(record_texts, min_size=1, max_size=5))
@example(texts=["a\u2028b"])  # json.dumps leaves U+2028, U+0085, ... unescaped
@example(texts=["a\x85b", "c\u2029d"])
def test_any_text_written_as_json_lines_reads_back_exactly(folder, texts):
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    path = write(folder, ".jsonl", jsonl(lines))
    documents = read_documents(path)
    assert [(d.text, d.source) for d in documents] == [
        (t, f"{path}:{n}") for n, t in enumerate(texts, start=1)]


@FUZZ
@given(text=st.text(max_size=200))
def test_any_plain_text_is_read_or_a_data_error_naming_the_file(folder, text):
    read_or_data_error(write(folder, ".txt", text.encode("utf-8", "surrogatepass")))


# Any text JSON can carry; now and then with an unpaired surrogate ("\\ud800").
json_texts = st.tuples(st.text(max_size=30), st.integers(0, 9),
                       st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)).map(
    lambda drawn: drawn[0] + drawn[2] if drawn[1] == 5 else drawn[0])
text_records = st.fixed_dictionaries({"text": json_texts}) | st.fixed_dictionaries(
    {"instruction": json_texts, "output": json_texts}, optional={"input": json_texts | st.none()})


@settings(FUZZ, max_examples=40)
@given(lines=st.lists(text_records.map(json.dumps), min_size=1, max_size=4), chat=st.booleans())
@example(lines=['{"text": "\\ud800 alone"}'], chat=False)  # json gives a lone surrogate
@example(lines=['{"instruction": "x", "output": "\\udfff"}'], chat=True)
def test_loading_hostile_data_for_training_gives_blocks_or_a_data_error(
        folder, tokenizers, lines, chat):
    # All the way to token blocks: splitting hashes the text, the tokenizer encodes it.
    path = write(folder, ".jsonl", jsonl(lines))
    read_or_data_error(path, lambda p: load_site_data(p, tokenizers[chat], seq_len=16))


def test_a_huge_valid_line_is_read(folder):
    text = "word " * 400_000
    path = write(folder, ".jsonl", jsonl([json.dumps({"text": text})]))
    assert read_documents(path)[0].text == text
