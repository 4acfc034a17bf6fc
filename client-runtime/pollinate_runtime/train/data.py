"""A site's private text, read from local disk and never sent anywhere.

Accepted inputs (a file, or a folder whose `*.jsonl` and `*.txt` files are read recursively in
sorted order):
- JSONL of `{"text": ...}` records, or of instruction records `{"instruction", "input"?,
  "output"}` rendered with the tokenizer's chat template;
- plain text, split into documents at blank lines and at lines holding only `%` (the `fortune`
  format).

Documents are split into train and eval by a hash of their text, so the split is the same on every
run and on every machine, and a duplicated document never sits on both sides. Each side is then
tokenized, joined with EOS, and cut into fixed-length blocks; the last partial block is padded and
its padding is masked out of the loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt",)
IGNORE_INDEX = -100
_SEPARATOR_LINE = re.compile(r"^\s*%?\s*$")
_RECORD_SHAPE = 'a JSON object with "text" or "instruction"/"output"'


class DataError(ValueError):
    """Site data that cannot be used; the message names the file, the line and what was expected."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path:line" where the document starts

    @property
    def split_score(self) -> float:
        """A number in [0, 1) fixed by the text alone."""
        digest = hashlib.sha256(self.text.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class TokenBlocks:
    """Fixed-length training examples: `labels` is `input_ids` with padding set to -100."""

    input_ids: torch.Tensor  # [n, seq_len] int64
    attention_mask: torch.Tensor  # [n, seq_len] int64
    labels: torch.Tensor  # [n, seq_len] int64

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def select(self, index: torch.Tensor | Sequence[int]) -> TokenBlocks:
        return TokenBlocks(self.input_ids[index], self.attention_mask[index], self.labels[index])


@dataclass(frozen=True)
class SiteData:
    train: TokenBlocks
    eval: TokenBlocks
    num_train_documents: int
    num_eval_documents: int


# -------------------------------------------------------------------------------------- reading


def data_files(path: str | Path) -> list[Path]:
    """The files under `path` that hold documents."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if root.is_file():
        return [root]
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in JSONL_SUFFIXES + TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"data folder {root} holds no .jsonl or .txt files")
    return files


def read_documents(path: str | Path,
                   tokenizer: PreTrainedTokenizerBase | None = None) -> list[Document]:
    """Every document under `path`; `tokenizer` renders instruction records with its chat
    template (without one, a plain `### Instruction` layout is used)."""
    documents: list[Document] = []
    for file in data_files(path):
        if file.suffix in JSONL_SUFFIXES:
            documents.extend(_read_jsonl(file, tokenizer))
        else:
            documents.extend(_read_text(file))
    if not documents:
        raise DataError(f"data path {path} holds no documents (all files are empty)")
    return documents


def _lines(file: Path, *, json_lines: bool = False) -> Iterable[tuple[int, str]]:
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{file}:{line}: expected UTF-8 text, got byte 0x{raw[exc.start]:02x} "
            "(is this a binary file?)"
        ) from None
    # JSON Lines end at "\n" alone: str.splitlines would also cut a record at U+2028, U+0085
    # and other characters a JSON string may hold unescaped.
    return enumerate(text.split("\n") if json_lines else text.splitlines(), start=1)


def _read_text(file: Path) -> list[Document]:
    documents: list[Document] = []
    paragraph: list[str] = []
    start = 0
    for number, line in _lines(file):
        if _SEPARATOR_LINE.match(line):
            if paragraph:
                documents.append(Document("\n".join(paragraph).strip(), f"{file}:{start}"))
                paragraph = []
            continue
        if not paragraph:
            start = number
        paragraph.append(line.rstrip())
    if paragraph:
        documents.append(Document("\n".join(paragraph).strip(), f"{file}:{start}"))
    return documents


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _read_jsonl(file: Path, tokenizer: PreTrainedTokenizerBase | None) -> list[Document]:
    documents: list[Document] = []
    for number, line in _lines(file, json_lines=True):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: expected {_RECORD_SHAPE}, got invalid JSON "
                            f"({exc.msg} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # an int of > 4300 digits, deep nesting
            raise DataError(f"{where}: expected {_RECORD_SHAPE}, got JSON Python cannot "
                            f"read ({exc})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected {_RECORD_SHAPE}, got {_json_kind(record)}")
        text = _record_text(record, where, tokenizer)
        if text.strip():
            documents.append(Document(text, where))
    return documents


def _string_field(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: expected "{key}" to be a string, got {_json_kind(value)}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800" escapes decode to unpaired surrogates
        raise DataError(f'{where}: expected "{key}" to be text, got \\u{ord(value[exc.start]):04x} '
                        f"(half of a UTF-16 surrogate pair) at character {exc.start}") from None
    return value


def _record_text(record: dict[str, Any], where: str,
                 tokenizer: PreTrainedTokenizerBase | None) -> str:
    if "text" in record:
        return _string_field(record, "text", where)
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise DataError(f'{where}: an instruction record needs "instruction" and '
                                f'"output", "{key}" is missing')
        instruction = _string_field(record, "instruction", where)
        extra = _string_field(record, "input", where) if record.get("input") is not None else ""
        output = _string_field(record, "output", where)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return render_instruction(prompt, output, tokenizer)
    keys = ", ".join(f'"{k[:40]}"' for k in list(record)[:5]) or "none"
    raise DataError(f"{where}: expected {_RECORD_SHAPE}, got an object with keys {keys}")


def render_instruction(prompt: str, answer: str,
                       tokenizer: PreTrainedTokenizerBase | None) -> str:
    """One instruction/answer exchange as text, in the model's own chat format when it has one."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"### Instruction:\n{prompt}\n\n### Response:\n{answer}"


# ------------------------------------------------------------------------------------ splitting


def split_documents(documents: Sequence[Document], eval_fraction: float = 0.1
                    ) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, eval) split by each document's text hash.

    With at least two documents, neither side is left empty: the lowest-scoring document goes to
    eval, or the highest-scoring one to train.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction {eval_fraction} must be in [0, 1)")
    train = [d for d in documents if d.split_score >= eval_fraction]
    evals = [d for d in documents if d.split_score < eval_fraction]
    if eval_fraction > 0 and not evals and len(train) >= 2:
        first = min(train, key=lambda d: d.split_score)
        evals = [d for d in train if d.split_score == first.split_score]
        train = [d for d in train if d.split_score != first.split_score]
    if not train and len(evals) >= 2:
        last = max(evals, key=lambda d: d.split_score)
        train = [d for d in evals if d.split_score == last.split_score]
        evals = [d for d in evals if d.split_score != last.split_score]
    return train, evals


# ----------------------------------------------------------------------------------- tokenizing


def tokenize_blocks(documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase,
                    seq_len: int) -> TokenBlocks:
    """Join the documents' tokens (EOS after each) and cut them into `seq_len` blocks."""
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len} must be at least 2")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids: list[int] = []
    if documents:
        # Chat-rendered text already carries its special tokens as text.
        encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
        for tokens in encoded:
            ids.extend(tokens)
            ids.append(eos)
    n_full, rest = divmod(len(ids), seq_len)
    if rest:
        ids.extend([pad] * (seq_len - rest))
    n_blocks = n_full + (1 if rest else 0)
    input_ids = torch.tensor(ids, dtype=torch.long).view(n_blocks, seq_len)
    mask = torch.ones_like(input_ids)
    if rest:
        mask[-1, rest:] = 0
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return TokenBlocks(input_ids, mask, labels)


def load_site_data(path: str | Path, tokenizer: PreTrainedTokenizerBase, seq_len: int = 128,
                   eval_fraction: float = 0.1) -> SiteData:
    """Read, split and tokenize a site's data."""
    documents = read_documents(path, tokenizer)
    train_docs, eval_docs = split_documents(documents, eval_fraction)
    train = tokenize_blocks(train_docs, tokenizer, seq_len)
    evals = tokenize_blocks(eval_docs, tokenizer, seq_len)
    if len(train) == 0:
        raise DataError(f"data path {path} yields no training text")
    if len(evals) == 0 and eval_fraction > 0 and len(train) >= 2:
        # A single document: fall back to holding out its trailing blocks.
        n_eval = max(1, round(len(train) * eval_fraction))
        evals = train.select(range(len(train) - n_eval, len(train)))
        train = train.select(range(len(train) - n_eval))
    log.info("site data %s: %d documents -> %d train blocks, %d eval blocks of %d tokens",
             path, len(documents), len(train), len(evals), seq_len)
    return SiteData(train=train, eval=evals, num_train_documents=len(train_docs),
                    num_eval_documents=len(eval_docs))


def load_eval_blocks(path: str | Path, tokenizer: PreTrainedTokenizerBase,
                     seq_len: int = 128) -> TokenBlocks:
    """All of `path` as evaluation blocks (no split): for held-out text and `pollinate-client
    eval`."""
    return tokenize_blocks(read_documents(path, tokenizer), tokenizer, seq_len)
