"""The container runtime of the node agent: a container is a local process tree.

A container's process is started as

    ip netns exec <pod netns> unshare --mount --uts --propagation private sh -c <setup> -- <argv>

so it runs in the pod's network namespace (with the pod's /etc/hosts and /etc/resolv.conf,
bind-mounted by `ip netns exec` from /etc/netns/<netns>/), in a mount namespace of its own
where the setup script bind-mounts each volume at its mountPath (read-only where kubelet
would), under the pod's hostname, in its workingDir, and then execs the command: every step
execs the next, so the process the agent started is the container's main process and its
exit status is the container's exit code. The image is ignored: commands resolve on PATH.

Mount points must exist to mount on. Those that do not exist on the host are created there
(an empty folder, or an empty file for a file mounted by subPath), recorded in
`host-mountpoints`, and removed again on cleanup if still empty: the host sees empty folders
such as /data while the agent runs, never the pods' data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from .pod_volumes import Mount

log = logging.getLogger(__name__)

# A failed mount or workingDir ends the setup script with this code before the command runs.
SETUP_FAILED_EXIT = 128


def _tool(name: str) -> str:
    # Absolute paths: the container's own PATH may lack /usr/sbin, or be anything.
    return shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") or name


IP, UNSHARE, SH, HOSTNAME, MOUNT, MKDIR, TOUCH = (
    _tool(t) for t in ("ip", "unshare", "sh", "hostname", "mount", "mkdir", "touch"))


class StartError(RuntimeError):
    """The container's process could not be started (kubelet's StartError, exit 128)."""


class HostMountpoints:
    """Mount points the agent had to create on the host, removed on cleanup when empty."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self._lock = threading.Lock()

    def ensure(self, target: str, is_file: bool) -> None:
        path = Path(target)
        if path.exists():
            return
        top = path
        while not top.parent.exists():
            top = top.parent
        with self._lock:
            with open(self.record, "a") as f:
                f.write(f"{top}\n")
            if is_file:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)

    def remove_empty(self) -> None:
        if not self.record.exists():
            return
        for line in sorted(set(self.record.read_text().split()), key=len, reverse=True):
            _remove_if_empty(Path(line))
        self.record.unlink()


def _remove_if_empty(top: Path) -> None:
    if top.is_file():
        if top.stat().st_size == 0:
            top.unlink()
        return
    if not top.is_dir() or top.is_symlink():
        return
    for dirpath, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
        d = Path(dirpath)
        for f in d.iterdir():
            if f.is_file() and not f.is_symlink() and f.stat().st_size == 0:
                f.unlink()
        with contextlib.suppress(OSError):
            d.rmdir()


STAGE_ROOT = "/run/pollinate-testbed/stage"


def _kept_under(target: str, needed: list[str]) -> list[str]:
    """The host folders directly under `target` that hold something the container needs
    from the host (its commands' environment, its volumes' sources)."""
    top = PurePosixPath(target)
    kept = set()
    for path in needed:
        p = PurePosixPath(path)
        if p != top and p.is_relative_to(top):
            kept.add(str(top / p.relative_to(top).parts[0]))
    return sorted(kept)


def setup_script(mounts: list[Mount], hostname: str, working_dir: str,
                 needed: list[str] | None = None) -> str:
    """The shell run inside the container's namespaces before its command is exec'd.

    A volume mounted over a host folder the container still needs (an emptyDir on /tmp when
    the runtime or the testbed's state lives under /tmp) would hide it: those folders are
    bound to a staging point first and bound back inside the new volume afterwards."""
    needed = [*(needed or []), *(str(m.source) for m in mounts)]
    lines = [f"{HOSTNAME} {shlex.quote(hostname)}"]
    mounted: list[str] = []
    stage = f"{STAGE_ROOT}/{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    for m in mounts:
        target, source = shlex.quote(m.target), shlex.quote(str(m.source))
        kept = _kept_under(m.target, needed)
        for i, path in enumerate(kept):
            staged = shlex.quote(f"{stage}/{len(mounted)}-{i}")
            lines.append(f"{MKDIR} -p {staged} && {MOUNT} --rbind {shlex.quote(path)} {staged} "
                         f"|| exit {SETUP_FAILED_EXIT}")
        # Mount points under an earlier mount live in that volume: make them there.
        if any(PurePosixPath(m.target).is_relative_to(p) for p in mounted):
            make = f"{TOUCH} {target}" if m.source.is_file() else f"{MKDIR} -p {target}"
            lines.append(f"{make} || exit {SETUP_FAILED_EXIT}")
        lines.append(f"{MOUNT} --bind {source} {target} || exit {SETUP_FAILED_EXIT}")
        if m.read_only:
            lines.append(f"{MOUNT} -o remount,bind,ro {target} || exit {SETUP_FAILED_EXIT}")
        for i, path in enumerate(kept):
            staged = shlex.quote(f"{stage}/{len(mounted)}-{i}")
            lines.append(f"{MKDIR} -p {shlex.quote(path)} && {MOUNT} --rbind {staged} {shlex.quote(path)} "
                         f"|| exit {SETUP_FAILED_EXIT}")
        mounted.append(m.target)
    lines.append(f"cd {shlex.quote(working_dir)} || exit {SETUP_FAILED_EXIT}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def resolve_command(argv: list[str], env: dict[str, str]) -> str:
    """The executable of argv[0] on the container's PATH, or a StartError as runc says it."""
    found = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if found is None:
        raise StartError(f'exec: "{argv[0]}": executable file not found in $PATH')
    return found


class ContainerProcess:
    """One run of one container: started in its own session so its tree can be signalled."""

    def __init__(self, netns: str, argv: list[str], env: dict[str, str], mounts: list[Mount],
                 hostname: str, working_dir: str, log_file: Path,
                 mountpoints: HostMountpoints, on_exit: Callable[[], None] = lambda: None) -> None:
        mounted: list[str] = []
        for m in mounts:
            if not any(PurePosixPath(m.target).is_relative_to(p) for p in mounted):
                mountpoints.ensure(m.target, m.source.is_file())
            mounted.append(m.target)
        resolve_command(argv, env)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        needed = [d for d in env.get("PATH", "").split(os.pathsep) if d.startswith("/")]
        script = setup_script(mounts, hostname, working_dir, needed)
        self._launcher = [IP, "netns", "exec", netns,
                          UNSHARE, "--mount", "--uts", "--propagation", "private",
                          SH, "-c", script, argv[0]]
        self._exec_seen = False
        with open(log_file, "ab") as out:
            self.popen = subprocess.Popen(
                [*self._launcher, *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, cwd="/",
            )
        self.pid = self.popen.pid
        # Wakes the pod's worker the moment the process ends, instead of at its next tick.
        threading.Thread(target=self._wait_then_call, args=(on_exit,), daemon=True,
                         name=f"wait-{self.pid}").start()

    def _wait_then_call(self, on_exit: Callable[[], None]) -> None:
        self.popen.wait()
        on_exit()

    def poll(self) -> int | None:
        return self.popen.poll()

    def executing_command(self) -> bool:
        """Past the setup (namespaces, mounts): the process is now the container's command,
        so an exec probe entering its namespaces sees what the command sees."""
        if not self._exec_seen:
            try:
                cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                return False
            launchers = (self._launcher[0], self._launcher[5], self._launcher[9])
            self._exec_seen = cmdline[0].decode(errors="replace") not in launchers
        return self._exec_seen

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def terminate(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds: kubelet's stop; returns the exit code."""
        if self.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=max(grace, 0))
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait()
        # Whatever else is left in its process group (children that ignored SIGTERM).
        self.signal(signal.SIGKILL)
        return self.exit_code()

    def exit_code(self) -> int:
        code = self.popen.returncode
        # A process killed by signal N exits 128+N in a container (137 for SIGKILL).
        return 128 - code if code is not None and code < 0 else (code or 0)
