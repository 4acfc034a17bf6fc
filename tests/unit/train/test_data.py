"""A site's private data: formats, errors that name file and line, the deterministic split."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pollinate_runtime.train.data import (
    IGNORE_INDEX,
    DataError,
    Document,
    load_site_data,
    read_documents,
    split_documents,
    tokenize_blocks,
)
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# ---- formats -------------------------------------------------------------------------------


def test_plain_text_splits_at_blank_lines_and_percent_lines(tmp_path: Path):
    notes = write(tmp_path / "notes.txt",
                  "first line\nstill first\n\n\nsecond\n%\nthird (fortune style)\n%\n\n")
    docs = read_documents(notes)
    assert [d.text for d in docs] == ["first line\nstill first", "second",
                                      "third (fortune style)"]
    assert [d.source for d in docs] == [f"{notes}:1", f"{notes}:5", f"{notes}:7"]


def test_jsonl_text_records_become_documents_and_blank_lines_are_skipped(tmp_path: Path):
    path = write(tmp_path / "d.jsonl", jsonl({"text": "alpha"}, "", {"text": "beta", "id": 7},
                                            {"text": "   "}))
    docs = read_documents(path)
    assert [(d.text, d.source) for d in docs] == [("alpha", f"{path}:1"), ("beta", f"{path}:3")]


def test_instruction_records_use_the_chat_template(tmp_path: Path, tokenizer):
    path = write(tmp_path / "i.jsonl", jsonl(
        {"instruction": "Name a colour.", "output": "Blue."},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
    ))
    first, second = read_documents(path, tokenizer)
    assert first.text == "<|user|>\nName a colour.<|endoftext|>\n<|assistant|>\nBlue.<|endoftext|>\n"
    assert "<|user|>\nTranslate\n\nchat<|endoftext|>" in second.text
    assert second.text.endswith("<|assistant|>\ncat<|endoftext|>\n")


def test_instruction_records_without_a_chat_template_use_a_plain_layout(tmp_path: Path):
    path = write(tmp_path / "i.jsonl", jsonl({"instruction": "Q?", "input": None, "output": "A."}))
    [doc] = read_documents(path, tokenizer=None)
    assert doc.text == "### Instruction:\nQ?\n\n### Response:\nA."


def test_a_folder_is_read_recursively_in_sorted_order_skipping_other_files(tmp_path: Path):
    write(tmp_path / "b.txt", "from b")
    write(tmp_path / "a" / "z.jsonl", jsonl({"text": "from a/z"}))
    write(tmp_path / "corpus.json", "{}")
    write(tmp_path / "image.png", b"\x89PNG")
    write(tmp_path / ".hidden" / "x.txt", "hidden")
    assert [d.text for d in read_documents(tmp_path)] == ["from a/z", "from b"]


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        ([{"text": "ok"}, [1, 2]], 2,
         'expected a JSON object with "text" or "instruction"/"output", got a list'),
        (['{"text": "unterminated'], 1,
         'expected a JSON object with "text" or "instruction"/"output", got invalid JSON'),
        ([{"prompt": "x", "completion": "y"}], 1,
         'expected a JSON object with "text" or "instruction"/"output", '
         'got an object with keys "prompt", "completion"'),
        ([{"text": ["a"]}], 1, 'expected "text" to be a string, got a list'),
        ([{"instruction": "x"}], 1,
         'an instruction record needs "instruction" and "output", "output" is missing'),
        ([{"instruction": "x", "output": 3}], 1, 'expected "output" to be a string, got a number'),
        (["", "", '"just a string"'], 3,
         'expected a JSON object with "text" or "instruction"/"output", got a string'),
    ],
)
def test_bad_jsonl_is_a_data_error_naming_file_and_line(tmp_path: Path, lines, line, message):
    path = write(tmp_path / "data" / "notes.jsonl", jsonl(*lines))
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:{line}: {message}")):
        read_documents(path)


def test_binary_file_is_a_data_error_naming_the_line(tmp_path: Path):
    path = write(tmp_path / "x.txt", b"line one\nline two\n\xff\xfe oops\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: expected UTF-8 text, got byte 0xff")):
        read_documents(path)


def test_missing_path_is_a_data_error_naming_it(tmp_path: Path):
    missing = tmp_path / "nowhere" / "notes.jsonl"
    with pytest.raises(DataError, match=re.escape(f"data path {missing} does not exist")):
        read_documents(missing)


def test_folder_without_data_files_is_a_data_error(tmp_path: Path):
    write(tmp_path / "readme.md", "# nothing here")
    with pytest.raises(DataError, match=re.escape("holds no .jsonl or .txt files")):
        read_documents(tmp_path)


def test_only_empty_files_is_a_data_error(tmp_path: Path):
    write(tmp_path / "a.txt", "\n\n%\n")
    write(tmp_path / "b.jsonl", "\n")
    with pytest.raises(DataError, match="holds no documents"):
        read_documents(tmp_path)


# ---- split ---------------------------------------------------------------------------------


def docs(n: int) -> list[Document]:
    return [Document(f"document number {i}", f"f.txt:{i}") for i in range(n)]


def test_split_is_deterministic_and_independent_of_order():
    train, evals = split_documents(docs(500), 0.1)
    again_train, again_eval = split_documents(list(reversed(docs(500))), 0.1)
    assert {d.text for d in evals} == {d.text for d in again_eval}
    assert {d.text for d in train} == {d.text for d in again_train}
    assert 25 <= len(evals) <= 75  # about 10 %
    assert len(train) + len(evals) == 500


def test_duplicate_documents_land_on_the_same_side():
    duplicated = docs(50) + docs(50)
    train, evals = split_documents(duplicated, 0.2)
    assert not {d.text for d in train} & {d.text for d in evals}


def test_split_keeps_both_sides_nonempty_for_few_documents():
    for n in (2, 3, 5):
        train, evals = split_documents(docs(n), 0.1)
        assert train and evals, n


def test_eval_fraction_zero_keeps_everything_for_training():
    train, evals = split_documents(docs(20), 0.0)
    assert len(train) == 20 and evals == []


# ---- blocks --------------------------------------------------------------------------------


def test_blocks_join_documents_with_eos_and_mask_the_padding(tokenizer):
    documents = [Document("hello world", "a:1"), Document("a second document", "a:2")]
    ids = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in documents]
    n_tokens = len(ids[0]) + len(ids[1]) + 2
    blocks = tokenize_blocks(documents, tokenizer, seq_len=4)
    assert blocks.input_ids.shape == (-(-n_tokens // 4), 4)
    flat = blocks.input_ids.flatten().tolist()
    assert flat[: n_tokens] == ids[0] + [tokenizer.eos_token_id] + ids[1] + [tokenizer.eos_token_id]
    assert blocks.num_tokens == n_tokens
    padding = blocks.attention_mask == 0
    assert (blocks.labels[padding] == IGNORE_INDEX).all()
    assert (blocks.labels[~padding] == blocks.input_ids[~padding]).all()


def test_site_data_splits_then_tokenizes(site_text_dir: Path, tokenizer):
    data = load_site_data(site_text_dir, tokenizer, seq_len=64, eval_fraction=0.1)
    assert len(data.train) > 3 * len(data.eval) > 0
    assert data.train.input_ids.shape[1] == 64
    assert data.num_train_documents + data.num_eval_documents == len(read_documents(site_text_dir))


def test_a_single_document_holds_out_its_last_blocks(tmp_path: Path, tokenizer):
    path = write(tmp_path / "one.txt", " ".join(["a long single paragraph"] * 200))
    data = load_site_data(path, tokenizer, seq_len=16, eval_fraction=0.1)
    assert len(data.eval) >= 1 and len(data.train) >= 9 * len(data.eval) - 9
