"""The client runtime installs on a laptop on its own: `./client-runtime[train]` with dev.lock as
constraints, in a fresh virtual environment, the way README and client-runtime/pyproject.toml tell
a site to. Nothing of the operator comes with it (no kopf, no kubernetes client), the CLI runs and
names a bad input, and torch is loaded only once training is asked for.

The install goes through the uv that `make env` puts in ~/.cache/pollinate and its shared wheel
cache, so every wheel (torch included) is linked from ~/.cache/uv: a first run on a machine only
fetches package metadata from the index. No model weights are loaded, so none are downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from locked_versions import LOCK, locked
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LAPTOP_EXTRA = "train"  # client-runtime/pyproject.toml: "a laptop installs pollinate-runtime[train]"
OPERATOR_ONLY = ("kopf", "kubernetes")
TRAINING_STACK = ("torch", "transformers", "peft")


def cached_uv() -> Path:
    """The uv `make env` installs, found from tools/env.sh so the version is written once."""
    version = re.search(r"^uv_version=(\S+)$", (ROOT / "tools/env.sh").read_text(), re.M)
    assert version, "tools/env.sh no longer sets uv_version"
    cache = Path(os.environ.get("POLLINATE_CACHE", Path.home() / ".cache/pollinate"))
    return cache / f"uv-{version.group(1)}" / "bin" / "uv"


class Laptop:
    """A fresh venv holding only the client runtime, and a clean environment to run it in."""

    def __init__(self, venv: Path, home: Path) -> None:
        self.venv = venv
        self.home = home
        # No PYTHONPATH (pytest's tests/support), no VIRTUAL_ENV of the dev env; a HOME of its
        # own, so a model or Hugging Face download would show up as files under it.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env.update(HOME=str(home), HF_HOME=str(home / "hf"), POLLINATE_WORK_DIR=str(home / "site"))

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command = [str(self.venv / "bin" / argv[0]), *argv[1:]]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=self.home)

    def python(self, code: str) -> subprocess.CompletedProcess:
        return self.run("python", "-c", textwrap.dedent(code))


@pytest.fixture(scope="module")
def laptop(tmp_path_factory) -> Laptop:
    uv = cached_uv()
    if not uv.exists():
        pytest.fail(f"{uv} is missing: `make env` installs it")
    extras = tomllib.loads((ROOT / "client-runtime/pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert LAPTOP_EXTRA in extras, f"client-runtime has no [{LAPTOP_EXTRA}] extra any more"
    work = tmp_path_factory.mktemp("laptop")
    # Built from a copy: a build writes build/ and *.egg-info next to the sources.
    source = work / "client-runtime"
    shutil.copytree(ROOT / "client-runtime", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = work / "venv"
    subprocess.run([str(uv), "venv", "--quiet", "--python", sys.executable, str(venv)],
                   check=True, capture_output=True, text=True, timeout=120)
    # Resolved by uv (not --no-deps): what the package itself declares decides what comes along.
    result = subprocess.run(
        [str(uv), "pip", "install", "--quiet", "--python", str(venv / "bin/python"),
         "--constraint", str(LOCK), f"{source}[{LAPTOP_EXTRA}]"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"installing ./client-runtime[{LAPTOP_EXTRA}]:\n{result.stderr[-3000:]}"
    home = work / "home"
    home.mkdir()
    return Laptop(venv, home)


def installed(laptop: Laptop) -> dict[str, str]:
    listed = laptop.python("""
        import json
        from importlib import metadata
        print(json.dumps({d.metadata["Name"]: d.version for d in metadata.distributions()}))
        """)
    assert listed.returncode == 0, listed.stderr[-2000:]
    return {canonicalize_name(n): v for n, v in json.loads(listed.stdout).items()}


def test_the_laptop_install_brings_neither_kopf_nor_the_kubernetes_client(laptop: Laptop) -> None:
    packages = installed(laptop)
    assert "pollinate-runtime" in packages
    assert not set(OPERATOR_ONLY) & set(packages), sorted(set(OPERATOR_ONLY) & set(packages))
    for module in OPERATOR_ONLY:
        result = laptop.python(f"import {module}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (
            f"{module} is importable in the laptop install")


def test_the_laptop_install_is_the_tested_one(laptop: Laptop) -> None:
    # Every package the resolver chose is one dev.lock pins, at its pinned version: a site
    # trains on what the tests ran, and nothing outside the lock had to be downloaded.
    packages = installed(laptop)
    assert set(TRAINING_STACK) <= set(packages), f"[{LAPTOP_EXTRA}] did not bring {TRAINING_STACK}"
    pins = locked()
    unpinned = {n: v for n, v in packages.items() if n != "pollinate-runtime" and pins.get(n) != v}
    assert not unpinned, f"installed but not pinned (at that version) by dev.lock: {unpinned}"
    where = laptop.python("import pollinate_runtime; print(pollinate_runtime.__file__)")
    assert where.stdout.strip().startswith(str(laptop.venv)), where.stdout  # not the clone's copy


def test_pollinate_client_help_runs(laptop: Laptop) -> None:
    top = laptop.run("pollinate-client", "--help", timeout=120)
    assert top.returncode == 0, top.stderr[-2000:]
    assert "join" in top.stdout and "eval" in top.stdout
    join = laptop.run("pollinate-client", "join", "--help", timeout=120)
    assert join.returncode == 0, join.stderr[-2000:]
    for flag in ("--server", "--site", "--data", "--ca", "--key"):
        assert flag in join.stdout


def test_join_with_a_missing_data_file_says_which_file_and_what_it_should_be(laptop: Laptop) -> None:
    missing = laptop.home / "notes.jsonl"
    result = laptop.run("pollinate-client", "join", "--server", "127.0.0.1:9", "--site", "alice-laptop",
                        "--data", str(missing), "--insecure", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"pollinate-client: error: --data {missing}: does not exist; expected this site's private "
        "training data (a .jsonl or .txt file, or a folder of them)")
    assert "Traceback" not in result.stderr


def test_torch_loads_only_once_training_is_asked_for(laptop: Laptop) -> None:
    notes = laptop.home / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"note {i}: the patient is well."}) + "\n"
                             for i in range(20)))
    probe = laptop.python(f"""
        import json, sys
        from pathlib import Path

        def heavy():
            return sorted(m for m in sys.modules if m.split(".")[0] in {TRAINING_STACK!r})

        # Everything `pollinate-client join` imports to start, before it checks the data.
        import pollinate_runtime, pollinate_runtime.cli, pollinate_runtime.site_trainer
        import pollinate_runtime.client_app, pollinate_runtime.supernode
        args = pollinate_runtime.cli.build_parser().parse_args(
            ["join", "--server", "127.0.0.1:9", "--site", "alice", "--data", "{notes}", "--insecure"])
        at_start = heavy()
        # Checking the training data is the first step that needs the training stack.
        pollinate_runtime.cli.check_data(Path(args.data))
        after_data = heavy()
        # The [{LAPTOP_EXTRA}] extra carries everything local training imports.
        import pollinate_runtime.train.model, pollinate_runtime.train.local
        print(json.dumps({{"at_start": at_start, "after_data": after_data}}))
        """)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["at_start"] == [], f"imported before training was asked for: {seen['at_start']}"
    assert "torch" in seen["after_data"]
    # Nothing was fetched from a model hub on the way: the hub cache was never even created.
    assert not (laptop.home / "hf").exists(), sorted(map(str, (laptop.home / "hf").rglob("*")))
