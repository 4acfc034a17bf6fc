"""Warm ClientApp processes: the SuperExec that the paced SuperNode starts forks each
`flwr-clientapp` from a warm process, with Flower's own arguments, entry point and exit status."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
import types

import pytest
from flwr.supercore.constant import TASK_TYPE_TO_COMMAND
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supernode import start_client_internal
from pollinate_runtime import superexec, supernode


def test_flower_still_starts_the_superexec_and_clientapps_by_the_names_rerouted():
    assert subprocess_executor.subprocess is subprocess
    assert "subprocess.Popen(args" in inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    assert superexec.CLIENTAPP_COMMAND in TASK_TYPE_TO_COMMAND.values()
    assert start_client_internal.subprocess is subprocess
    assert f'command = ["{superexec.SUPEREXEC_COMMAND}"]' in inspect.getsource(start_client_internal)


def test_rerouted_sends_only_its_command_elsewhere(monkeypatch):
    real: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: real.append(args) or "real")
    routed = superexec.Rerouted("flwr-clientapp", lambda args, kw: ("warm", args, kw))
    assert routed.Popen(("flwr-clientapp", "--token", "t"), stdout=None) == (
        "warm", ["flwr-clientapp", "--token", "t"], {"stdout": None})
    assert routed.Popen(["pip", "list"]) == "real" and real == [["pip", "list"]]
    assert routed.DEVNULL is subprocess.DEVNULL  # every other attribute is the real module's


def test_the_supernode_starts_pollinates_superexec_with_flowers_flags(monkeypatch):
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: started.append(args))
    loop = type(sys)("loop")
    loop.subprocess = subprocess
    supernode.warm_superexec(loop)
    loop.subprocess.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9"])
    assert started == [[sys.executable, "-m", "pollinate_runtime.superexec", "--insecure",
                        "--runtime-api-address", "127.0.0.1:9"]]


def test_warm_superexec_refuses_a_loop_that_no_longer_uses_subprocess():
    with pytest.raises(RuntimeError, match="pinned flwr"):
        supernode.warm_superexec(type(sys)("moved"))


@pytest.mark.parametrize(("raw", "warm"), [("1", True), ("", True), ("on", True), ("0", False),
                                           ("false", False), (" Off ", False)])
def test_warm_clientapps_are_the_default_and_can_be_turned_off(raw, warm):
    assert superexec.warm_enabled({superexec.WARM_ENV: raw}) is warm
    assert superexec.warm_enabled({}) is True


def test_a_bad_warm_setting_is_refused_naming_the_variable():
    with pytest.raises(ValueError, match=superexec.WARM_ENV):
        superexec.warm_enabled({superexec.WARM_ENV: "maybe"})


@pytest.mark.slow  # starts a Python process with Flower's imports
def test_a_warm_clientapp_runs_flowers_entry_point_with_flowers_arguments():
    launcher = superexec.WarmLauncher()
    launcher.start()
    ok = launcher(["flwr-clientapp", "--help"], {"stdout": subprocess.DEVNULL})
    bad = launcher(["flwr-clientapp", "--no-such-flag"], {"stdout": subprocess.DEVNULL})
    ok.join(120)
    bad.join(120)
    assert ok.exitcode == 0  # argparse printed Flower's help and exited
    assert bad.exitcode == 2  # Flower's own argument error


@pytest.mark.slow  # starts a Python process with Flower's imports
def test_the_superexec_is_flower_superexec_with_its_flags():
    out = subprocess.run([sys.executable, "-m", "pollinate_runtime.superexec", "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--runtime-api-address" in out


def stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.subprocess = subprocess  # type: ignore[attr-defined]
    # What only_pollinate_apps and reply_before_pulling_again wrap (test_supernode.py tests
    # them).
    module._pull_and_store_message = lambda *, get_fab, receive, **_: None  # type: ignore[attr-defined]
    module._insert_message = lambda *_: None  # type: ignore[attr-defined]
    module._push_messages = lambda **_: None  # type: ignore[attr-defined]
    return module


def test_the_paced_supernode_reroutes_its_superexec_unless_turned_off():
    warm, cold = stand_in("warm"), stand_in("cold")
    warm.time = cold.time = time  # type: ignore[attr-defined]
    supernode.prepare(warm, {superexec.WARM_ENV: "1"})
    supernode.prepare(cold, {superexec.WARM_ENV: "0"})
    assert isinstance(warm.subprocess, superexec.Rerouted)
    assert warm.subprocess.command == superexec.SUPEREXEC_COMMAND
    assert cold.subprocess is subprocess
    assert isinstance(warm.time, supernode.PacedTime) and isinstance(cold.time, supernode.PacedTime)


@pytest.mark.slow  # starts the warm launcher's process
def test_the_superexec_routes_clientapps_to_a_started_warm_launcher_unless_turned_off():
    warm, cold = stand_in("warm"), stand_in("cold")
    launcher = superexec.prepare(warm, {superexec.WARM_ENV: "1"})
    assert superexec.prepare(cold, {superexec.WARM_ENV: "0"}) is None
    assert cold.subprocess is subprocess
    assert isinstance(warm.subprocess, superexec.Rerouted)
    assert warm.subprocess.command == superexec.CLIENTAPP_COMMAND
    assert warm.subprocess.launch is launcher
    process = warm.subprocess.Popen(["flwr-clientapp", "--help"], stdout=subprocess.DEVNULL)
    process.join(120)
    assert process.exitcode == 0


def test_an_idle_superexec_polls_for_tasks_less_often(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    now, launched = [100.0], [100.0]
    paced = superexec.PacedPolls(lambda: launched[0], clock=lambda: now[0])
    paced.sleep(0.25)
    now[0] += superexec.IDLE_AFTER_SECONDS + 1  # nothing launched for a minute: between runs
    paced.sleep(0.25)
    launched[0] = now[0]  # a task
    paced.sleep(0.25)
    assert slept == [0.25, superexec.IDLE_POLL_SECONDS, 0.25]
    assert paced.monotonic is time.monotonic  # everything else is the real module


def test_flowers_superexec_loop_sleeps_only_between_task_polls():
    # PacedPolls takes every sleep of the loop module for a task poll's.
    from flwr.supercore.superexec import run_superexec

    source = inspect.getsource(run_superexec)
    assert [line.strip() for line in source.splitlines() if "time." in line and "import" not in line] == [
        "time.sleep(task_poll_interval)"]
    with pytest.raises(RuntimeError, match="pinned flwr"):
        superexec.pace(types.ModuleType("moved"), types.SimpleNamespace(last_active=lambda: 0.0))


def test_a_clientapp_still_running_keeps_the_superexec_active(monkeypatch):
    class Running:
        alive = True

        def is_alive(self) -> bool:
            return self.alive

    launcher = superexec.WarmLauncher.__new__(superexec.WarmLauncher)  # no fork server needed
    launcher.last_launch, launcher._process = 0.0, Running()
    monkeypatch.setattr(superexec.time, "monotonic", lambda: 500.0)
    assert launcher.last_active() == 500.0  # training for minutes: still active
    launcher._process.alive = False
    monkeypatch.setattr(superexec.time, "monotonic", lambda: 900.0)
    assert launcher.last_active() == 500.0  # ended: idle from when it was last seen running
