"""The tiny causal LM behind the training tests: a Llama built from a config, with a byte-level
BPE tokenizer trained here on Python's own docstrings (real English, offline, a few tens of KB).
Imported by conftest.py and by tests that need the constants."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import shutil
from pathlib import Path

import torch
from pollinate_runtime.train.device import DeviceChoice
from pollinate_runtime.train.model import LoraSettings

CPU = DeviceChoice(device="cpu", dtype="float32")
TINY_LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|endoftext|>\n{% endfor %}"
)


def docstring_corpus(modules: tuple[str, ...]) -> list[str]:
    """Paragraphs of the docstrings of `modules` and their public members."""
    paragraphs: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        objects = [module, *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_"))]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and (obj is module or getattr(obj, "__module__", None) == name):
                paragraphs.extend(p.strip() for p in doc.split("\n\n") if len(p.strip()) > 40)
    return paragraphs


# Two "domains" for training tests: what the base model saw, and what a site adapts it to.
BASE_MODULES = ("json", "argparse", "collections", "functools", "itertools", "textwrap")
SITE_MODULES = ("pathlib", "datetime", "re", "shutil")


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(tokenizer, texts: list[str], seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A short full pretraining on the base domain, so LoRA adapts a model that knows English
    # rather than a random one (as a site would).
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    seq = 64
    blocks = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(60):
        batch = blocks[torch.randint(len(blocks), (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


def cached_tiny_llama() -> Path:
    """The tiny Llama as a Hugging Face folder, built once per machine and cached under
    ~/.cache/pollinate/models, keyed by this file (its recipe). Tests and benchmarks share it."""
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("POLLINATE_CACHE", Path.home() / ".cache/pollinate"))
    folder = cache / "models" / f"tiny-llama-{key}"
    if not (folder / "config.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        base_texts = docstring_corpus(BASE_MODULES)
        tokenizer = train_tokenizer(base_texts + docstring_corpus(SITE_MODULES))
        build_tiny_llama(tokenizer, base_texts).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another test process (make test's other lane) built it meanwhile
            if not (folder / "config.json").exists():
                raise
            shutil.rmtree(tmp)
    return folder
