"""How a site stays in its federation across SuperNode exits.

Flower's SuperNode ends for reasons a site must tell apart: the server stopped answering
(an outage, a restarted or rescheduled server pod: Flower gives up after its own retries,
about one to two minutes), the server refused to activate the site's key (its previous
connection still counts as online until its heartbeats lapse, or the key is unknown), the
server ended the session (401: the key was revoked, or a restarted server does not know it
yet), or a problem only the person running the site can fix (a wrong CA or key). The first
three pass, or may pass, on their own: `pollinate-client join` starts another SuperNode for a
while. `Rejoin` decides; it is pure so that its rules are unit-tested without a server.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

SITE_SECRET = "the site Secret <federation>-site-<site>"

ACTIVATION_REFUSED = (
    "the server rejected this site's key: it is not registered with the Federation (or was "
    f"revoked). Check that --key is site.key from {SITE_SECRET} and that the site is in the "
    "Federation's spec.sites")
REVOKED = (
    "the server ended this site's session: its key is no longer registered (the site was "
    "removed from the Federation's spec.sites or its key was revoked). Ask the Federation's "
    f"operator; a new key comes in {SITE_SECRET}")
SERVER_LOST = (
    "the server stopped answering and did not come back within --reconnect-seconds: check "
    "that it is running (the Federation's status) and that this machine can still reach it")
KNOWN_FAILURES = [
    (re.compile(r"No SuperNode found with the given public key|code: 2004|Failed to activate SuperNode"),
     ACTIVATION_REFUSED),
    (re.compile(r"All SuperNodes must be registered"),
     f"the server requires a registered site key: pass --key with site.key from {SITE_SECRET}"),
    (re.compile(r"Unable to parse the private key"),
     "Flower could not read --key: expected an OpenSSH EC private key (site.key)"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error"),
     "certificate problem: TLS with the server failed; check --ca (the Federation's ca.crt) "
     "and the server name in --server"),
]
# Flower's last words when its retries ran out on a server that is not there.
GAVE_UP = re.compile(r"Giving up reconnection|Exit Code: 305|Connection refused|ConnectError|"
                     r"Temporary failure in name resolution|Name or service not known")
# A TLS handshake that timed out: Flower gives up at once on any error that mentions SSL (as
# for a certificate it does not trust), but a server too busy to finish a handshake in time
# is a server to try again, not a wrong --ca.
HANDSHAKE_TIMED_OUT = re.compile(r"handshake operation timed out|"
                                 r"_ssl\.c:\d+: The (read|write) operation timed out")
# The SuperNode logs its node id once the server has activated it.
ACTIVATED = "SuperNode ID:"
# The ClientApp under way shares the SuperNode's output; when the SuperNode ends it can no
# longer reach it and says so ("[Errno 111] Connection refused"): about its own local link,
# not the server, so it must not pass for a lost server.
CLIENTAPP_ORPHANED = re.compile(r"Failed to push task output|Failed to push reply message")
RETRY_SECONDS = 10.0

Trouble = Literal["refused", "lost", "fatal"]


def explain_supernode_exit(output_tail: Iterable[str]) -> str | None:
    """The known failure the SuperNode's last lines show, in words for the site's person."""
    text = "\n".join(output_tail)
    for pattern, message in KNOWN_FAILURES:
        if pattern.search(text):
            return message
    return None


@dataclass(frozen=True)
class SupernodeExit:
    code: int
    tail: tuple[str, ...]
    activated: bool  # the server activated it (it got a node id) before it ended

    def trouble(self) -> tuple[Trouble, str | None]:
        """What kind of end this was, and what to tell the person if it is the last one."""
        if HANDSHAKE_TIMED_OUT.search("\n".join(self.tail)):
            return "lost", SERVER_LOST
        reason = explain_supernode_exit(self.tail)
        if reason == ACTIVATION_REFUSED:
            return "refused", reason
        if reason is None and GAVE_UP.search("\n".join(self.tail)):
            # Whatever its exit code: Flower 1.41 ends with 0 after giving up mid-session.
            return "lost", SERVER_LOST
        if reason is None and self.code == 0:
            # Flower ends its SuperNode gracefully when the server answers 401; nobody here
            # asked it to stop (a stop is handled before this), so the server did.
            return "refused", REVOKED
        return "fatal", reason


@dataclass(frozen=True)
class Retry:
    seconds: float
    why: str


@dataclass(frozen=True)
class GiveUp:
    message: str | None  # None: nothing known; the caller points at the log


@dataclass
class Rejoin:
    """When to start another SuperNode. A refusal is retried for `rejoin_seconds` from the
    first refusal in a row, a lost server for `reconnect_seconds` (0: until the site is
    stopped) from when it was lost; a SuperNode the server activated starts the count again."""

    rejoin_seconds: float
    reconnect_seconds: float = 0.0
    _trouble: Trouble | None = None
    _since: float = 0.0
    _key_worked: bool = False  # the server activated this site's key once since the join

    def after(self, exit_: SupernodeExit, now: float) -> Retry | GiveUp:
        kind, message = exit_.trouble()
        self._key_worked |= exit_.activated
        if exit_.activated or kind != self._trouble:
            self._trouble, self._since = kind, now
        waited = now - self._since
        if kind == "refused" and waited < self.rejoin_seconds:
            return Retry(RETRY_SECONDS, "the server refused to activate this site yet (its previous "
                         "connection may still count as online, or the server restarted and does "
                         f"not know its key yet); retrying for up to {self.rejoin_seconds:g} s")
        if kind == "lost" and (self.reconnect_seconds <= 0 or waited < self.reconnect_seconds):
            return Retry(RETRY_SECONDS, f"the server stopped answering ({waited:.0f} s since this "
                         "site noticed, after Flower's own retries); starting the SuperNode again "
                         f"in {RETRY_SECONDS:g} s")
        if kind == "refused" and self._key_worked:
            # The key worked earlier in this join and no longer does, however the session
            # ended (a 401, or a lost server that then refused it): it was revoked.
            return GiveUp(REVOKED)
        return GiveUp(message)


# Flower's exit message (flwr_exit): "Exit Code: N", then why, on the lines that follow.
EXIT_MESSAGE = "Exit Code:"
EXIT_MESSAGE_LINES = 12


def relay_output(lines: Iterable[str], tail: deque[str], verbose: bool,
                 supernode_exited: threading.Event, activated: threading.Event | None = None,
                 log: logging.Logger | None = None, last_words: list[str] | None = None) -> None:
    """Keep the SuperNode's last lines (to explain its exit), note its activation, and pass
    on what a person should see. Flower's exit message goes to `last_words` as well: the
    SuperExec retrying its gone SuperNode while the SuperNode shuts down (seconds on a loaded
    machine) can push it out of the tail."""
    for line in lines:
        line = line.rstrip()
        if last_words is not None and (
                EXIT_MESSAGE in line or 0 < len(last_words) < EXIT_MESSAGE_LINES):
            last_words.append(line)
        if supernode_exited.is_set() and "Connection attempt failed" in line:
            # The orphaned SuperExec calling its gone SuperNode until it notices: kept out of
            # the tail too, where it would push out the line that says why the SuperNode exited.
            continue
        if activated is not None and ACTIVATED in line:
            activated.set()
        if not CLIENTAPP_ORPHANED.search(line):
            tail.append(line)
        if log is not None and (verbose or "ERROR" in line or "WARN" in line):
            log.info("supernode: %s", line)


def run_supernode(command: list[str], env: dict[str, str], verbose: bool,
                  current: list[subprocess.Popen], log: logging.Logger | None = None,
                  activated: threading.Event | None = None) -> SupernodeExit:
    """Run Flower's SuperNode until it exits; `activated` is set once the server activates it."""
    # Same process group as this one: whoever stops the site stops its SuperNode too.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    current.append(proc)
    tail: deque[str] = deque(maxlen=50)
    last_words: list[str] = []
    exited = threading.Event()
    activated = activated if activated is not None else threading.Event()
    relay = threading.Thread(target=relay_output, args=(proc.stdout, tail, verbose, exited, activated, log,
                                                        last_words), daemon=True)
    relay.start()
    code = proc.wait()
    exited.set()
    # The SuperNode's own flower-superexec shares its stdout and exits once the SuperNode's
    # pid is gone, which an unreaped (zombie) SuperNode is not: reading to the end of the
    # output before reaping would wait forever. Reaped now, the pipe closes within a second.
    relay.join(timeout=15)
    return SupernodeExit(code, (*last_words, *tail), activated.is_set())
