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


@pytest.mark.slow  # runs pollinate-client eval in a process
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


@pytest.mark.slow  # runs pollinate-client eval in a process
def test_eval_without_an_adapter_says_what_to_give(site_text_dir: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pollinate-client"), "eval", "--data", str(site_text_dir)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "give --adapter-dir, or --s3-bucket, --s3-prefix and --adapter-version" in done.stderr


def test_a_lower_rank_site_trains_the_leading_slice_of_the_global_adapter(
        tiny_model_dir: Path, site_text_dir: Path, tmp_path: Path) -> None:
    """sites[].rank: a rank-2 site in a rank-4 Federation takes the global adapter's leading two
    rank rows/columns, trains at rank 2 and sends an update the server accepts as rank 2. It also
    scores the general held-out text (--general-eval) each round, for forgetting."""
    from pollinate_runtime.train.local import evaluate
    from pollinate_runtime.wire import AdapterSpec, to_record, validate_update

    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(["The general text every site also scores, to see forgetting."] * 40))
    config = RunConfig.from_flower(run_config(tiny_model_dir))
    config_low = RunConfig(base_model=str(tiny_model_dir), lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                           local_max_steps=5, batch_size=4, sequence_length=64, learning_rate=1e-2,
                           transport_dtype="float32", site_ranks={"low": 2}).to_flower()
    full = SiteTrainer(SiteOptions(site="full", data=site_text_dir, device="cpu"))
    global_adapter = full.handle({"kind": "train", "config": run_config(tiny_model_dir), "round": 1,
                                  "adapter": None})["adapter"]
    low = SiteTrainer(SiteOptions(site="low", data=site_text_dir, device="cpu", general_eval=general))
    answer = low.handle({"kind": "train", "config": config_low, "round": 2, "adapter": global_adapter})

    assert answer["metrics"][m.SITE_RANK] == 2.0
    for name, value in answer["adapter"].items():
        full_shape = global_adapter[name].shape
        expected = (2, full_shape[1]) if "lora_A" in name else (full_shape[0], 2)
        assert value.shape == expected, name
    # It started from the global adapter's leading slice: evaluating that slice before
    # training gives the eval loss the site reported for the global adapter.
    sliced = {n: (v[:2, :] if "lora_A" in n else v[:, :2]) for n, v in global_adapter.items()}
    load_adapter_state(low._loaded.model, sliced)
    before, _ = evaluate(low._loaded.model, low._data.eval)
    assert before == pytest.approx(answer["metrics"][m.EVAL_LOSS], rel=1e-5)
    general_loss, _ = evaluate(low._loaded.model, low._general)
    assert general_loss == pytest.approx(answer["metrics"][m.GENERAL_LOSS], rel=1e-5)

    spec = AdapterSpec.from_template(global_adapter)
    accepted = validate_update(to_record(answer["adapter"], config.transport_dtype), spec,
                               max_norm=config.max_update_norm, expected_round=2, reported_round=2)
    assert {n: v.shape for n, v in accepted.items()} == {n: v.shape for n, v in answer["adapter"].items()}
