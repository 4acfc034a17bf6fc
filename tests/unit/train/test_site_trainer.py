"""The site trainer `pollinate-client join` runs, and `pollinate-client eval`, on the tiny model:
real training and real command lines, no server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pollinate_runtime import messages as m
from pollinate_runtime.run_config import RunConfig
from pollinate_runtime.site_trainer import SiteOptions, SiteTrainer
from pollinate_runtime.train.data import load_eval_blocks, load_site_data
from pollinate_runtime.train.local import LocalTrainingConfig, evaluate, train_round
from pollinate_runtime.train.model import load_adapter_state, load_model
from tiny_lm import CPU, TINY_LORA


def run_config(model: Path) -> dict:
    return RunConfig(base_model=str(model), lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                     local_max_steps=5, batch_size=4, sequence_length=64, learning_rate=1e-2,
                     transport_dtype="float32").to_flower()


def test_a_training_request_reports_every_local_step_and_the_model_stays_resident(
        tiny_model_dir: Path, site_text_dir: Path) -> None:
    events: list[tuple[str, dict]] = []
    trainer = SiteTrainer(SiteOptions(site="alice-laptop", data=site_text_dir, device="cpu"),
                          on_event=lambda kind, info: events.append((kind, info)))
    first = trainer.handle({"kind": "train", "config": run_config(tiny_model_dir), "round": 1,
                            "adapter": None})
    steps = [info for kind, info in events if kind == "step"]
    assert [(s["round"], s["step"], s["steps"]) for s in steps] == [(1, k, 5) for k in range(1, 6)]
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert [kind for kind, _ in events] == ["loading", "training", *["step"] * 5, "trained"]
    assert first["metrics"][m.LOAD_SECONDS] > 0

    events.clear()
    second = trainer.handle({"kind": "train", "config": run_config(tiny_model_dir), "round": 2,
                             "adapter": first["adapter"]})
    assert "loading" not in [kind for kind, _ in events]  # the model was kept
    assert second["metrics"][m.LOAD_SECONDS] == 0.0


@pytest.fixture
def trained_adapter_dir(tiny_model_dir: Path, site_text_dir: Path, tmp_path: Path) -> Path:
    """An adapter trained on the site text, saved by PEFT (adapter_model.safetensors and
    adapter_config.json naming the tiny model as its base)."""
    loaded = load_model(str(tiny_model_dir), TINY_LORA, CPU)
    data = load_site_data(site_text_dir, loaded.tokenizer, seq_len=64)
    train_round(loaded.model, None, data, LocalTrainingConfig(
        max_steps=30, batch_size=8, learning_rate=1e-2, seed=1, transport_dtype="float32"))
    folder = tmp_path / "adapter"
    loaded.model.save_pretrained(folder)
    return folder


def test_eval_prints_the_perplexity_of_the_base_model_and_of_the_adapter(
        trained_adapter_dir: Path, tiny_model_dir: Path, site_text_dir: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pollinate-client"), "eval", "--adapter-dir",
         str(trained_adapter_dir), "--data", str(site_text_dir), "--device", "cpu",
         "--sequence-length", "64"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])

    # The same numbers, computed here from PEFT's files with the library functions.
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(tiny_model_dir), TINY_LORA, CPU)
    blocks = load_eval_blocks(site_text_dir, loaded.tokenizer, 64)
    base_loss, base_ppl = evaluate(loaded.model, blocks)
    saved = load_file(str(trained_adapter_dir / "adapter_model.safetensors"))
    load_adapter_state(loaded.model, {k: np.asarray(v) for k, v in saved.items()})
    adapter_loss, adapter_ppl = evaluate(loaded.model, blocks)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           trained_adapter_dir)
    peft_loss, _ = evaluate(peft_model, blocks)

    assert printed["blocks"] == len(blocks)
    assert printed["base_perplexity"] == pytest.approx(base_ppl, rel=1e-4)
    assert printed["adapter_perplexity"] == pytest.approx(adapter_ppl, rel=1e-4)
    assert printed["adapter_loss"] == pytest.approx(peft_loss, rel=1e-4)
    # Trained on this very text: the adapter must score it better than the base model.
    assert printed["adapter_perplexity"] < 0.95 * printed["base_perplexity"], printed
    assert base_loss > adapter_loss


def test_eval_without_an_adapter_says_what_to_give(site_text_dir: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pollinate-client"), "eval", "--data", str(site_text_dir)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "give --adapter-dir, or --s3-bucket, --s3-prefix and --adapter-version" in done.stderr
