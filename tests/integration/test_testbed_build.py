"""The Go binaries of tools/testbed/build.sh: built once per machine and then reused from
~/.cache/pollinate/testbed by every clone, and a helm stamped so that offline rendering and
linting assume Kubernetes 1.35 (an unstamped helm assumes 1.20).

No cluster needed: these run the build script (a cache hit after `make testbed`) and the
binaries it returns.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from pollinate_testbed.cluster import BUILD_SCRIPT, build_binaries

TESTBED = BUILD_SCRIPT.parent
K8S_VERSION = re.search(r"^K8S_VERSION=(v1\.\d+\.\d+)$", BUILD_SCRIPT.read_text(), re.M).group(1)
K8S_MINOR = K8S_VERSION.split(".")[1]


def run_build(script: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def cached_binaries(bin_dir: Path) -> dict[str, tuple[int, int]]:
    """Each binary the bin dir links to, by name: (inode, mtime in ns) of the cached file."""
    binaries = {}
    for link in sorted(bin_dir.iterdir()):
        if link.is_symlink():
            target = link.resolve(strict=True)
            stat = target.stat()
            binaries[link.name] = (stat.st_ino, stat.st_mtime_ns)
    return binaries


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return build_binaries()


# ---- the cache ------------------------------------------------------------------------------
def test_a_second_build_reuses_every_cached_binary(tmp_path: Path) -> None:
    first = run_build(BUILD_SCRIPT)  # builds only what is missing (nothing, after `make testbed`)
    bin_dir = Path(first.stdout.strip().splitlines()[-1])
    before = cached_binaries(bin_dir)
    assert {"kube-apiserver", "kubectl", "etcd", "kwok", "helm", "minio"} <= set(before)
    bin_inode = bin_dir.stat().st_ino

    second = run_build(BUILD_SCRIPT)
    assert "building" not in second.stderr, f"the second build compiled again:\n{second.stderr}"
    assert Path(second.stdout.strip().splitlines()[-1]) == bin_dir
    assert bin_dir.stat().st_ino == bin_inode  # the bin dir was not remade either
    assert cached_binaries(bin_dir) == before  # the very same files: not rebuilt, not relinked

    # Another clone (CI's fresh one) hits the same cache: the keys hash the module files'
    # contents, not where the clone is.
    clone = tmp_path / "clone" / "testbed"
    shutil.copytree(TESTBED, clone, ignore=shutil.ignore_patterns("pollinate_testbed", "*.toml",
                                                                  "__pycache__", "*.egg-info"))
    elsewhere = run_build(clone / BUILD_SCRIPT.name)
    assert "building" not in elsewhere.stderr, f"a second clone compiled again:\n{elsewhere.stderr}"
    assert Path(elsewhere.stdout.strip().splitlines()[-1]) == bin_dir
    assert cached_binaries(bin_dir) == before


def cache_without(bin_dir: Path, cache: Path, missing: str) -> dict[str, str]:
    """A cache of its own holding every binary of `bin_dir` (linked, with their stamps) but
    `missing`; returns the environment that points build.sh at it."""
    for link in bin_dir.iterdir():
        if link.is_symlink() and link.name != missing:
            target = link.resolve(strict=True)
            keyed = cache / "testbed" / target.parent.name
            keyed.mkdir(parents=True)
            (keyed / target.name).symlink_to(target)
            (keyed / f"{target.name}.built").symlink_to(target.parent / f"{target.name}.built")
    return {**os.environ, "POLLINATE_CACHE": str(cache)}


def test_two_builds_at_once_compile_a_missing_binary_once(bin_dir: Path, tmp_path: Path) -> None:
    # Every binary but kube-scheduler (the quickest to link again: its compiled packages are in
    # Go's build cache), then two builds at the same time, as when a CI run and a test's
    # testbed start together on one machine.
    cache = tmp_path / "cache"
    env = cache_without(bin_dir, cache, "kube-scheduler")
    builds = [subprocess.Popen(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env) for _ in range(2)]
    outputs = [build.communicate(timeout=1800) for build in builds]
    assert [b.returncode for b in builds] == [0, 0], [err[-2000:] for _, err in outputs]
    logs = "".join(err for _, err in outputs)
    assert re.findall(r"building (\S+)", logs) == ["kube-scheduler"], logs
    made = {Path(out.strip().splitlines()[-1]) for out, _ in outputs}
    assert made == {cache / "testbed" / bin_dir.name}
    (ours,) = made
    assert scheduler_version(ours) == f"Kubernetes {K8S_VERSION}"
    assert (ours / "kwok-stages.yaml").read_text() == (bin_dir / "kwok-stages.yaml").read_text()


def scheduler_version(bin_dir: Path) -> str:
    return subprocess.run([str(bin_dir / "kube-scheduler"), "--version"], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def fake_go(folder: Path, behaviour: str) -> dict[str, str]:
    """A `go` ahead of the real one on PATH whose `build` writes half of its output file, then
    `behaviour`s: `hang` (to be killed half-way) or `fail` (as on a full disk)."""
    folder.mkdir()
    real = shutil.which("go")
    (folder / "go").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        [ "$1" = build ] || exec {real} "$@"
        while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
        head -c 1000000 /dev/zero > "$out"
        echo "fake go: wrote half of $out" >&2
        {"sleep 3600" if behaviour == "hang" else 'echo "write $out: no space left on device" >&2; exit 1'}
        """))
    (folder / "go").chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_a_build_killed_half_way_is_built_again_not_used(bin_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = cache_without(bin_dir, cache, "kube-scheduler")
    build = subprocess.Popen(["bash", str(BUILD_SCRIPT), "core"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**env, **fake_go(tmp_path / "hang", "hang")}, start_new_session=True)
    def half_written() -> bool:
        return any(p.stat().st_size == 1000000 for p in cache.glob("testbed/kube-scheduler-*/*.tmp"))

    deadline = time.monotonic() + 120
    while not half_written() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert half_written(), "the fake go never started writing"
    os.killpg(build.pid, signal.SIGKILL)
    build.communicate()

    again = subprocess.run(["bash", str(BUILD_SCRIPT), "core"], capture_output=True, text=True, env=env,
                           timeout=1800)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "kube-scheduler: the cached copy is incomplete" in again.stderr, again.stderr
    assert re.findall(r"building (\S+)", again.stderr) == ["kube-scheduler"], again.stderr
    assert scheduler_version(Path(again.stdout.strip().splitlines()[-1])) == f"Kubernetes {K8S_VERSION}"


def test_a_build_that_runs_out_of_disk_publishes_nothing(bin_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = cache_without(bin_dir, cache, "kube-scheduler")
    full = subprocess.run(["bash", str(BUILD_SCRIPT), "core"], capture_output=True, text=True,
                          env={**env, **fake_go(tmp_path / "full", "fail")}, timeout=600)
    assert full.returncode != 0 and "no space left on device" in full.stderr
    (entry,) = [p for p in cache.glob("testbed/kube-scheduler-*") if p.is_dir()]
    assert not (entry / "kube-scheduler").exists() and not (entry / "kube-scheduler.built").exists()
    assert not list(cache.glob("testbed/bin-*")), "a bin directory was made from a failed build"


def test_a_cached_binary_changed_after_it_was_built_is_built_again(bin_dir: Path, tmp_path: Path) -> None:
    # A binary cut short after the build (a copy that ran out of disk, a restore gone wrong)
    # no longer matches the stamp written when it was moved into place whole.
    cache = tmp_path / "cache"
    env = cache_without(bin_dir, cache, "kube-scheduler")
    first = subprocess.run(["bash", str(BUILD_SCRIPT), "core"], capture_output=True, text=True, env=env,
                           timeout=1800)
    assert first.returncode == 0, first.stderr[-2000:]
    (entry,) = [p for p in cache.glob("testbed/kube-scheduler-*") if p.is_dir()]
    binary = entry / "kube-scheduler"
    with open(binary, "r+b") as f:
        f.truncate(binary.stat().st_size // 2)
    again = subprocess.run(["bash", str(BUILD_SCRIPT), "core"], capture_output=True, text=True, env=env,
                           timeout=1800)
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.findall(r"building (\S+)", again.stderr) == ["kube-scheduler"], again.stderr
    assert scheduler_version(Path(again.stdout.strip().splitlines()[-1])) == f"Kubernetes {K8S_VERSION}"


def test_the_binaries_are_cached_outside_the_clone(bin_dir: Path) -> None:
    clone = TESTBED.parents[1]
    for link in bin_dir.iterdir():
        assert not link.resolve().is_relative_to(clone), f"{link.name} lives in the clone"


# ---- helm assumes Kubernetes 1.35 offline ---------------------------------------------------
def probe_chart(folder: Path, kube_version: str, template: str) -> Path:
    (folder / "templates").mkdir(parents=True)
    (folder / "Chart.yaml").write_text(
        f"apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: '{kube_version}'\n")
    (folder / "templates" / "probe.yaml").write_text(textwrap.dedent(template))
    return folder


def helm(bin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    # No cluster to ask: an unreachable kubeconfig makes sure helm answers from its own defaults.
    env = {**os.environ, "KUBECONFIG": "/nonexistent/kubeconfig"}
    return subprocess.run([str(bin_dir / "helm"), *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_offline_helm_template_assumes_kubernetes_1_35(bin_dir: Path, tmp_path: Path) -> None:
    chart = probe_chart(tmp_path / "probe", f">=1.{K8S_MINOR}.0-0", """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: probe}
        data:
          version: {{ .Capabilities.KubeVersion.Version | quote }}
          major: {{ .Capabilities.KubeVersion.Major | quote }}
          minor: {{ .Capabilities.KubeVersion.Minor | quote }}
        """)
    rendered = helm(bin_dir, "template", "probe", str(chart))
    assert rendered.returncode == 0, rendered.stderr
    data = yaml.safe_load(rendered.stdout)["data"]
    assert (data["major"], data["minor"]) == ("1", K8S_MINOR)
    assert data["version"].startswith(f"v1.{K8S_MINOR}.")
    # The chart's kubeVersion is really checked: an older cluster is refused.
    older = helm(bin_dir, "template", "probe", str(chart), "--kube-version", f"1.{int(K8S_MINOR) - 1}.0")
    assert older.returncode != 0 and "incompatible with Kubernetes" in older.stderr


def test_offline_helm_lint_checks_deprecations_against_1_35(bin_dir: Path, tmp_path: Path) -> None:
    # resource.k8s.io/v1beta1 is deprecated as of Kubernetes 1.35: lint warns only if it
    # assumes 1.35 (helm's lint rules carry their own version stamp, apart from template's).
    chart = probe_chart(tmp_path / "probe", ">=1.29.0-0", """
        apiVersion: resource.k8s.io/v1beta1
        kind: DeviceClass
        metadata: {name: probe}
        spec: {}
        """)
    linted = helm(bin_dir, "lint", str(chart))
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "resource.k8s.io/v1beta1 DeviceClass is deprecated in v1.35+" in linted.stdout
    older = helm(bin_dir, "lint", str(chart), "--kube-version", "1.34.0")
    assert older.returncode == 0 and "deprecated" not in older.stdout


def test_helm_reports_the_release_it_was_built_from(bin_dir: Path) -> None:
    module = re.search(r"^\s*helm\.sh/helm/v3 (v\S+)", (TESTBED / "helm" / "go.mod").read_text(), re.M)
    assert module, "tools/testbed/helm/go.mod does not require helm.sh/helm/v3"
    version = helm(bin_dir, "version", "--template", "{{ .Version }}")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == module.group(1)
