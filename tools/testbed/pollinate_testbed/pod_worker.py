"""One pod's life on the node agent, from bound to deleted, as kubelet lives it.

A thread per pod: set up its sandbox (network namespace, address, hosts file) and volumes,
run its init containers one after another, then its containers; restart them by the pod's
restartPolicy with kubelet's back-off; run their probes; write what it observes to the pod's
status; and on deletion stop them (SIGTERM, the grace period, SIGKILL), tear everything down
and remove the pod object with gracePeriodSeconds=0.

Logs: every run of a container writes stdout and stderr to
`<agent dir>/logs/<namespace>_<pod>_<uid>/<container>/<restart count>.log`, kubelet's
/var/log/pods layout (see `container_log`).
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .kube_api import ApiError
from .pod_config import ContainerConfigError, ObjectSource, command_line, container_environment
from .pod_network import NetworkError, PodSandbox
from .pod_runtime import SETUP_FAILED_EXIT, ContainerProcess, StartError
from .pod_volumes import PodVolumes, VolumeError
from .probes import ProbeSpec, ProbeState, run_probe

if TYPE_CHECKING:
    from .node_agent import NodeAgent

log = logging.getLogger(__name__)

# kubelet's crash-loop back-off: 10 s doubling to 5 min, forgotten after 10 min of running.
BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0
RETRY_SETUP_EVERY = 2.0
TICK = 0.5


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def container_log(agent_dir: Path, pod: dict, container: str, restart_count: int = 0) -> Path:
    meta = pod["metadata"]
    folder = f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
    return agent_dir / "logs" / folder / container / f"{restart_count}.log"


@dataclass
class ContainerRun:
    """What the agent knows of one container across its restarts."""

    spec: dict
    is_init: bool
    restart_count: int = 0
    process: ContainerProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "PodInitializing"}})
    terminations: list[dict] = field(default_factory=list)  # the last two, newest last
    ready: bool = False
    started: bool = False
    probes: dict[str, ProbeState] = field(default_factory=dict)
    not_before: float = 0.0  # monotonic time of the next start attempt
    backoff: float = 0.0  # the delay before the next restart after a crash
    waiting: float = 0.0  # the delay applied to the pending restart
    began: float = 0.0  # monotonic start of the current run
    done: bool = False  # terminated and not to be restarted
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def running(self) -> bool:
        return self.process is not None

    def status(self, container_id_prefix: str) -> dict:
        state = {"waiting": None, "running": None, "terminated": None, **self.state}
        # lastState is the termination before the current state: while terminated, the one
        # before that.
        earlier = self.terminations[:-1] if "terminated" in self.state else self.terminations
        last = {"waiting": None, "running": None, "terminated": earlier[-1]} if earlier else {}
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started and self.process is not None,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": last,
        }
        if self.process is not None or "terminated" in self.state:
            status["containerID"] = f"pollinate://{container_id_prefix}-{self.name}-{self.restart_count}"
        return status


class PodWorker(threading.Thread):
    def __init__(self, agent: NodeAgent, pod: dict) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.api = agent.api
        self.uid: str = meta["uid"]
        self.ref = f"{meta['namespace']}/{meta['name']}"
        self._pod = pod
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.gone = False  # the pod object was removed from the API
        self.shutting_down = False  # the agent is stopping: kill, tear down, tell nobody
        self.pod_dir = agent.agent_dir / "pods" / self.uid
        self.sandbox: PodSandbox | None = None
        self.volumes: PodVolumes | None = None
        self.stage = "setup"  # setup -> init -> main -> terminal
        self.phase = pod.get("status", {}).get("phase", "Pending")
        self.setup_message = ""
        self.start_time = pod.get("status", {}).get("startTime") or now_rfc3339()
        self.conditions: dict[str, tuple[str, str]] = {}
        self.last_status: dict | None = None
        spec = pod["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.init = [ContainerRun(c, True) for c in spec.get("initContainers") or []]
        self.main = [ContainerRun(c, False) for c in spec["containers"]]
        self.init_index = 0
        # A pod finished before this agent started needs no report, only its deletion.
        self.reporting = self.phase not in ("Succeeded", "Failed")
        self._adopt(pod.get("status", {}).get("containerStatuses") or [])

    def _adopt(self, reported: list[dict]) -> None:
        """Take over a pod an earlier agent ran (this one was restarted, as after a node
        reboot): its processes are gone. Containers that had started count a restart; under
        restartPolicy Never they cannot restart, and end as kubelet's ContainerStatusUnknown."""
        if not self.reporting:
            return
        previous = {s["name"]: s for s in reported}
        for c in self.main:
            status = previous.get(c.name, {})
            state = status.get("state", {})
            had_run = "running" in state or "terminated" in state
            c.restart_count = status.get("restartCount", 0)
            if not had_run:
                continue
            if self.restart_policy != "Never":
                c.restart_count += 1
                continue
            terminated = state.get("terminated") or {
                "exitCode": 137, "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the node agent restarted",
                "startedAt": state.get("running", {}).get("startedAt", now_rfc3339()),
                "finishedAt": now_rfc3339()}
            c.state = {"terminated": terminated}
            c.terminations = [terminated]
            c.exit_code, c.done = terminated["exitCode"], True
        if self.restart_policy == "Never" and any(c.done for c in self.main):
            # What ran cannot be resumed, and what did not run must not start late.
            for c in self.main:
                if not c.done:
                    c.exit_code, c.done = 137, True
                    c.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                              "startedAt": now_rfc3339(), "finishedAt": now_rfc3339()}}
            self.stage = "terminal"
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.main) else "Failed"

    # ---- called from the agent's threads ---------------------------------------------
    @property
    def pod(self) -> dict:
        with self._lock:
            return self._pod

    def update(self, pod: dict) -> None:
        with self._lock:
            self._pod = pod
        self.wake.set()

    def removed(self) -> None:
        self.gone = True
        self.wake.set()

    def shutdown(self) -> None:
        self.shutting_down = True
        self.wake.set()

    # ---- the loop --------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._live()
        except Exception:
            log.exception("pod %s: worker failed", self.ref)
            self._kill_all(grace=0)
        finally:
            self._teardown(remove_volumes=self.gone or self.shutting_down)
            self.agent.worker_finished(self)

    def _live(self) -> None:
        while True:
            # Cleared before the work, so a wake-up during it is not lost.
            self.wake.clear()
            pod = self.pod
            if self.shutting_down:
                self._kill_all(grace=1)
                return
            if self.gone:
                self._kill_all(grace=2)
                return
            if pod["metadata"].get("deletionTimestamp"):
                self._stop_for_deletion(pod)
                return
            if self.stage == "setup":
                self._setup(pod)
            if self.stage == "init":
                self._step_init(pod)
            if self.stage == "main":
                self._step_main(pod)
            if self.stage == "terminal" and self.sandbox is not None:
                # Like kubelet, stop the sandbox of a finished pod at once; keep logs and volumes.
                self._teardown(remove_volumes=False)
            self._report()
            self.wake.wait(TICK if self.stage != "terminal" else 30)

    # ---- set-up ----------------------------------------------------------------------
    def _setup(self, pod: dict) -> None:
        if self.phase in ("Succeeded", "Failed"):
            # Finished before this agent started (it was restarted): nothing to run.
            self.stage = "terminal"
            return
        try:
            if self.sandbox is None:
                address = self.agent.take_address(pod["spec"]["nodeName"])
                sandbox = PodSandbox(self.agent.plan, self.uid, address)
                try:
                    sandbox.create(self.agent.hosts_content(pod, address))
                except NetworkError:
                    sandbox.destroy()
                    self.agent.give_back_address(pod["spec"]["nodeName"], address)
                    raise
                self.sandbox = sandbox
                self.agent.sandbox_ready(self)
            if self.volumes is None:
                volumes = PodVolumes(self.api, self._observed(pod), self.pod_dir, self.agent.agent_dir)
                volumes.prepare()
                self.volumes = volumes
        except (VolumeError, NetworkError, ApiError) as err:
            if self.setup_message != str(err):
                log.warning("pod %s: %s", self.ref, err)
            self.setup_message = str(err)
            self.wake.wait(RETRY_SETUP_EVERY)
            return
        self.setup_message = ""
        self.stage = "init" if self.init else "main"
        for c in self.main:
            c.state = {"waiting": {"reason": "PodInitializing" if self.init else "ContainerCreating"}}

    # ---- init containers -------------------------------------------------------------
    def _step_init(self, pod: dict) -> None:
        while self.init_index < len(self.init):
            c = self.init[self.init_index]
            self._advance(pod, c, restart=self.restart_policy != "Never", restart_on_success=False)
            if c.done and c.exit_code == 0:
                self.init_index += 1
                continue
            if c.done:  # failed and not to be restarted
                self.stage = "terminal"
                self.phase = "Failed"
                for m in self.main:
                    m.state = {"waiting": {"reason": "PodInitializing"}}
            return
        self.stage = "main"
        for m in self.main:
            m.state = {"waiting": {"reason": "ContainerCreating"}}

    # ---- containers ------------------------------------------------------------------
    def _step_main(self, pod: dict) -> None:
        policy = self.restart_policy
        for c in self.main:
            self._advance(pod, c, restart=policy in ("Always", "OnFailure"),
                          restart_on_success=policy == "Always")
            self._probe(pod, c)
        if all(c.done for c in self.main):
            self.stage = "terminal"
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.main) else "Failed"
            log.info("pod %s %s", self.ref, self.phase.lower())
        elif any(c.running or c.restart_count > 0 or c.done for c in self.main):
            self.phase = "Running"

    def _advance(self, pod: dict, c: ContainerRun, restart: bool, restart_on_success: bool) -> None:
        """Start, watch or restart one container, one step."""
        now = time.monotonic()
        if c.process is not None:
            code = c.process.poll()
            if code is None:
                return
            self._exited(c, c.process.exit_code(), now)
        if c.done:
            return
        if c.exit_code is not None:  # exited: restart or stay down
            if not restart or (c.exit_code == 0 and not restart_on_success):
                c.done = True
                return
            if now < c.not_before:
                c.state = {"waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {c.waiting:.0f}s restarting failed container={c.name} "
                               f"pod={pod['metadata']['name']}"}}
                return
            c.restart_count += 1
        elif now < c.not_before:
            return
        self._start(pod, c)

    def _start(self, pod: dict, c: ContainerRun) -> None:
        assert self.sandbox is not None and self.volumes is not None
        observed = self._observed(pod)
        try:
            env = container_environment(
                observed, c.spec, ObjectSource(self.api, pod["metadata"]["namespace"]),
                self.agent.service_environment(pod["metadata"]["namespace"]),
                self.agent.inherited_env, self.agent.node_allocatable(pod["spec"]["nodeName"]))
            argv = command_line(c.spec, env)
            mounts = self.volumes.mounts(c.spec)
        except (ContainerConfigError, VolumeError, ApiError) as err:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            c.not_before = time.monotonic() + RETRY_SETUP_EVERY
            c.exit_code = None
            return
        log_file = container_log(self.agent.agent_dir, pod, c.name, c.restart_count)
        started_at = now_rfc3339()
        try:
            c.process = ContainerProcess(
                self.sandbox.netns, argv, env, mounts,
                hostname=pod["spec"].get("hostname") or pod["metadata"]["name"],
                working_dir=c.spec.get("workingDir") or "/",
                log_file=log_file, mountpoints=self.agent.mountpoints, on_exit=self.wake.set)
        except (StartError, OSError) as err:
            # runc's StartError: the container "ran" and ended with 128 at once.
            log.warning("pod %s container %s: %s", self.ref, c.name, err)
            c.began = time.monotonic()
            c.state = {"running": {"startedAt": started_at}}
            self._exited(c, SETUP_FAILED_EXIT, time.monotonic(), reason="StartError", message=str(err))
            return
        log.info("pod %s container %s started (pid %d, run %d), log %s",
                 self.ref, c.name, c.process.pid, c.restart_count, log_file)
        c.env = env
        c.began = time.monotonic()
        c.exit_code = None
        c.state = {"running": {"startedAt": started_at}}
        c.ready = False
        c.started = not c.spec.get("startupProbe")
        c.probes = {}
        for kind in ("startup", "readiness", "liveness"):
            probe = ProbeSpec.of(kind, c.spec.get(f"{kind}Probe"))
            if probe and not c.is_init:
                c.probes[kind] = ProbeState(probe, started_at=c.began)
        if "readiness" not in c.probes and not c.is_init:
            c.ready = c.started

    def _exited(self, c: ContainerRun, code: int, now: float, reason: str | None = None,
                message: str = "") -> None:
        started = (c.state.get("running") or {}).get("startedAt", now_rfc3339())
        terminated = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                      "startedAt": started, "finishedAt": now_rfc3339(),
                      "containerID": f"pollinate://{self.uid[:8]}-{c.name}-{c.restart_count}"}
        if message:
            terminated["message"] = message
        c.state = {"terminated": terminated}
        c.terminations = [*c.terminations[-1:], terminated]
        c.process = None
        c.exit_code = code
        c.ready = False
        log.info("pod %s container %s exited %d", self.ref, c.name, code)
        # Back-off grows with each restart that follows a short run, as kubelet's does.
        if now - c.began > BACKOFF_RESET_AFTER:
            c.backoff = 0.0
        c.waiting = c.backoff
        c.not_before = now + c.waiting
        c.backoff = min(max(c.backoff * 2, BACKOFF_INITIAL), BACKOFF_MAX)

    # ---- probes ----------------------------------------------------------------------
    def _probe(self, pod: dict, c: ContainerRun) -> None:
        if c.process is None or not c.probes or self.sandbox is None:
            return
        if not c.process.executing_command():
            return  # still mounting its volumes: nothing to probe yet
        now = time.monotonic()
        order = ["startup"] if not c.started else ["readiness", "liveness"]
        for kind in order:
            state = c.probes.get(kind)
            if state is None or not state.due(now):
                continue
            ok, message = run_probe(state.probe, c.spec, self.sandbox.address, c.process.pid, c.env)
            state.record(ok, message, time.monotonic())
            if kind == "startup" and state.verdict:
                c.started = True
                c.ready = "readiness" not in c.probes
            elif kind == "readiness":
                if state.verdict is not None and c.ready != state.verdict:
                    log.info("pod %s container %s %s%s", self.ref, c.name,
                             "ready" if state.verdict else "not ready", f": {message}" if message else "")
                c.ready = bool(state.verdict)
            if kind in ("startup", "liveness") and state.verdict is False:
                log.info("pod %s container %s failed its %s probe, restarting: %s",
                         self.ref, c.name, kind, message)
                grace = float(state.probe.spec.get("terminationGracePeriodSeconds")
                              or pod["spec"].get("terminationGracePeriodSeconds", 30))
                code = c.process.terminate(grace)
                self._exited(c, code, time.monotonic())
                return

    # ---- status ----------------------------------------------------------------------
    def _observed(self, pod: dict) -> dict:
        """The pod with the addresses this agent gave it (for fieldRefs before any report)."""
        status = dict(pod.get("status") or {})
        if self.sandbox is not None:
            status.update(podIP=self.sandbox.address, podIPs=[{"ip": self.sandbox.address}])
        status.update(hostIP=self.agent.plan.gateway, hostIPs=[{"ip": self.agent.plan.gateway}])
        return {**pod, "status": status}

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> dict:
        value = "True" if ok else "False"
        previous = self.conditions.get(kind)
        if previous is None or previous[0] != value:
            self.conditions[kind] = (value, now_rfc3339())
        condition = {"type": kind, "status": value, "lastTransitionTime": self.conditions[kind][1],
                     "lastProbeTime": None, "reason": None, "message": None}
        if not ok and reason:
            condition.update(reason=reason, message=message or None)
        return condition

    def build_status(self) -> dict:
        terminal = self.stage == "terminal"
        unready = [c.name for c in self.main if not c.ready]
        initialized = self.init_index >= len(self.init)
        if self.stage == "setup" and self.setup_message:
            for c in self.main:
                c.state = {"waiting": {"reason": "ContainerCreating", "message": self.setup_message}}
        reason_unready = "PodCompleted" if terminal else "ContainersNotReady"
        message_unready = "" if terminal else f"containers with unready status: [{' '.join(unready)}]"
        if terminal:
            for c in self.main:
                c.ready = False
        conditions = [
            self._condition("PodReadyToStartContainers", self.sandbox is not None),
            self._condition("Initialized", initialized, "PodCompleted" if terminal else
                            "ContainersNotInitialized",
                            "" if terminal else "containers with incomplete status: "
                            f"[{' '.join(c.name for c in self.init[self.init_index:])}]"),
            self._condition("ContainersReady", not unready and not terminal, reason_unready,
                            message_unready),
            self._condition("Ready", not unready and not terminal, reason_unready, message_unready),
        ]
        gateway = self.agent.plan.gateway
        status: dict = {
            "phase": self.phase,
            "hostIP": gateway,
            "hostIPs": [{"ip": gateway}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": [c.status(self.uid[:8]) for c in self.main],
        }
        if self.init:
            status["initContainerStatuses"] = [c.status(self.uid[:8]) for c in self.init]
        address = self.sandbox.address if self.sandbox else self._reported_address()
        if address:
            status["podIP"] = address
            status["podIPs"] = [{"ip": address}]
        return status

    def _reported_address(self) -> str | None:
        return (self.last_status or {}).get("podIP")

    def _report(self) -> None:
        if not self.reporting:
            return
        status = self.build_status()
        if status == self.last_status:
            return
        meta = self.pod["metadata"]
        try:
            self.api.patch(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                           {"metadata": {"uid": self.uid}, "status": status})
            self.last_status = status
        except ApiError as err:
            if err.not_found:
                self.gone = True
            else:
                log.warning("pod %s: status update failed: %s", self.ref, err)

    # ---- stopping --------------------------------------------------------------------
    def _kill_all(self, grace: float) -> None:
        """SIGTERM every running container at once, SIGKILL what outlives `grace`."""
        running = [c for c in self.init + self.main if c.process is not None]
        for c in running:
            c.process.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.process.poll() is None for c in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in running:
            code = c.process.terminate(0)
            self._exited(c, code, time.monotonic())
            c.done = True

    def _stop_for_deletion(self, pod: dict) -> None:
        meta = pod["metadata"]
        grace = float(meta.get("deletionGracePeriodSeconds",
                               pod["spec"].get("terminationGracePeriodSeconds", 30)))
        if any(c.process is not None for c in self.init + self.main):
            log.info("pod %s deleted: stopping its containers (grace %.0f s)", self.ref, grace)
            self._kill_all(grace)
            self.stage = "terminal"
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.main) else "Failed"
            self._report()
        self._teardown(remove_volumes=True)
        try:
            self.api.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                            {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
        except ApiError as err:
            if not (err.not_found or err.conflict):
                log.warning("pod %s: delete failed: %s", self.ref, err)
        log.info("pod %s removed", self.ref)

    def _teardown(self, remove_volumes: bool) -> None:
        if self.sandbox is not None:
            self.agent.sandbox_gone(self)
            self.sandbox.destroy()
            self.agent.give_back_address(self.pod["spec"]["nodeName"], self.sandbox.address)
            self.sandbox = None
        if remove_volumes and self.volumes is not None:
            self.volumes.remove()
            self.volumes = None

