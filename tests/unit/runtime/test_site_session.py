"""When `pollinate-client join` starts another SuperNode, and when it gives up naming why
(site_session.Rejoin). The SuperNode output lines are Flower 1.41's own."""

from __future__ import annotations

import threading
from collections import deque

from pollinate_runtime import site_session
from pollinate_runtime.site_session import (
    ACTIVATION_REFUSED,
    REVOKED,
    SERVER_LOST,
    GiveUp,
    Rejoin,
    Retry,
    SupernodeExit,
    explain_supernode_exit,
    relay_output,
)

LOST = SupernodeExit(1, ("WARNING:   Connection attempt failed, retrying in 9.79 seconds",
                         "WARNING:   Giving up reconnection after 67.84 seconds and 11 tries.",
                         "ERROR:     [Errno 111] Connection refused"), activated=False)
# Flower 1.41 ends with 0 when it gives up in the middle of a session, with 305 (connection
# error) when it gives up before the server activated it.
LOST_MID_SESSION = SupernodeExit(0, ("WARNING:   Giving up reconnection after 63.51 seconds and 11 tries.",
                                     "ERROR:     [Errno 111] Connection refused"), activated=True)
LOST_AT_START = SupernodeExit(1, ("WARNING:   Giving up reconnection after 75.08 seconds and 11 tries.",
                                  "ERROR:     Exit Code: 305"), activated=False)
REFUSED = SupernodeExit(1, ("ERROR: Failed to activate SuperNode", "Exit Code: 305"), activated=False)
ENDED_BY_SERVER = SupernodeExit(0, ("INFO: Disconnect and shut down",), activated=True)
BAD_CA = SupernodeExit(1, ("ERROR: SSL/TLS handshake error detected.",), activated=False)


def activated(exit_: SupernodeExit) -> SupernodeExit:
    return SupernodeExit(exit_.code, exit_.tail, activated=True)


def test_a_lost_server_is_reconnected_to_until_the_site_is_stopped_by_default() -> None:
    rejoin = Rejoin(rejoin_seconds=180)
    for hours in range(0, 48, 6):
        assert isinstance(rejoin.after(LOST, hours * 3600.0), Retry)


def test_a_lost_server_is_told_by_flowers_last_words_not_its_exit_code() -> None:
    for exit_ in (LOST, LOST_MID_SESSION, LOST_AT_START):
        assert exit_.trouble() == ("lost", SERVER_LOST), exit_
    assert ENDED_BY_SERVER.trouble() == ("refused", REVOKED)
    assert REFUSED.trouble() == ("refused", ACTIVATION_REFUSED)


def test_a_lost_server_is_given_up_after_reconnect_seconds_naming_the_flag() -> None:
    rejoin = Rejoin(rejoin_seconds=180, reconnect_seconds=600)
    assert isinstance(rejoin.after(LOST, 0.0), Retry)
    assert isinstance(rejoin.after(LOST, 599.0), Retry)
    decision = rejoin.after(LOST, 601.0)
    assert decision == GiveUp(SERVER_LOST) and "--reconnect-seconds" in SERVER_LOST


def test_the_refusal_window_counts_from_the_first_refusal_not_from_the_join() -> None:
    # A site that ran for a day, lost its server and is then refused while its old connection
    # still counts as online gets the whole window (it used to count from the join).
    rejoin = Rejoin(rejoin_seconds=180)
    assert isinstance(rejoin.after(activated(LOST), 86_400.0), Retry)
    assert isinstance(rejoin.after(REFUSED, 86_500.0), Retry)
    assert isinstance(rejoin.after(REFUSED, 86_679.0), Retry)
    assert rejoin.after(REFUSED, 86_681.0) == GiveUp(REVOKED)


def test_a_key_that_worked_and_is_then_refused_is_named_revoked_however_the_session_ended() -> None:
    # Revoking a key mid-round: the SuperNode ends on the server's 401 while its ClientApp is
    # still running; the ClientApp's complaints that it cannot reach its SuperNode any more
    # ("Connection refused") are not a lost server. Seen as one all the same, the refusal
    # that follows still names the key as revoked: it worked earlier in this join.
    orphaned = ("INFO:      SuperNode ID: 1234567",
                "WARNING:   Connection attempt failed, retrying in 0.38 seconds",
                "ERROR:     Failed to push task output: [Errno 111] Connection refused")
    tail: deque[str] = deque(maxlen=50)
    activated_ = threading.Event()
    relay_output(iter(orphaned), tail, verbose=False, supernode_exited=threading.Event(),
                 activated=activated_)
    ended = SupernodeExit(0, tuple(tail), activated=activated_.is_set())
    assert ended.trouble() == ("refused", REVOKED)
    assert Rejoin(rejoin_seconds=0).after(ended, 0.0) == GiveUp(REVOKED)

    taken_for_lost = Rejoin(rejoin_seconds=0)
    assert isinstance(taken_for_lost.after(activated(LOST_MID_SESSION), 0.0), Retry)
    assert taken_for_lost.after(REFUSED, 10.0) == GiveUp(REVOKED)
    # A key the server never took is named as refused, not revoked.
    assert Rejoin(rejoin_seconds=0).after(REFUSED, 0.0) == GiveUp(ACTIVATION_REFUSED)


def test_a_supernode_the_server_activated_starts_the_count_again() -> None:
    rejoin = Rejoin(rejoin_seconds=100, reconnect_seconds=100)
    assert isinstance(rejoin.after(LOST, 0.0), Retry)
    assert isinstance(rejoin.after(activated(LOST), 90.0), Retry)  # it got back in, then lost it again
    assert isinstance(rejoin.after(LOST, 180.0), Retry)
    assert rejoin.after(LOST, 191.0) == GiveUp(SERVER_LOST)


def test_a_session_the_server_ended_is_retried_then_named_revoked() -> None:
    # A 401 is what revoking the key does, and also what a restarted server that has not
    # been given the key again answers: retried for the refusal window, then called revoked.
    rejoin = Rejoin(rejoin_seconds=60)
    assert isinstance(rejoin.after(ENDED_BY_SERVER, 0.0), Retry)
    assert isinstance(rejoin.after(REFUSED, 30.0), Retry)
    assert rejoin.after(REFUSED, 61.0) == GiveUp(REVOKED)


def test_without_a_refusal_window_a_revoked_key_ends_the_site_at_once() -> None:
    assert Rejoin(rejoin_seconds=0).after(ENDED_BY_SERVER, 5.0) == GiveUp(REVOKED)
    assert Rejoin(rejoin_seconds=0).after(REFUSED, 5.0) == GiveUp(ACTIVATION_REFUSED)


def test_a_problem_only_the_person_can_fix_ends_the_site_at_once() -> None:
    decision = Rejoin(rejoin_seconds=180).after(BAD_CA, 0.0)
    assert isinstance(decision, GiveUp) and "--ca" in decision.message
    unknown = SupernodeExit(1, ("Traceback (most recent call last):", "KeyError: 'x'"), activated=False)
    assert Rejoin(rejoin_seconds=180).after(unknown, 0.0) == GiveUp(None)


def test_a_tls_failure_is_not_taken_for_a_lost_server() -> None:
    # Flower logs connection failures before it detects the handshake error.
    tail = ("WARNING:   Connection attempt failed, retrying in 1.0 seconds",
            "ERROR: SSL/TLS handshake error detected.", "ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED]")
    assert SupernodeExit(1, tail, activated=False).trouble()[0] == "fatal"


def test_a_tls_handshake_that_timed_out_is_a_busy_server_to_retry_not_a_certificate_problem() -> None:
    # Seen in CI with the machine loaded: Flower gives up at once on any error naming SSL.
    tail = ("ERROR:     SSL/TLS handshake error detected.", "ERROR:     Exit Code: 305",
            "Failed to initialize the connection to the SuperLink.",
            "_ssl.c:989: The handshake operation timed out")
    ended = SupernodeExit(1, tail, activated=False)
    assert ended.trouble() == ("lost", SERVER_LOST)
    assert isinstance(Rejoin(rejoin_seconds=0).after(ended, 0.0), Retry)


def test_the_reason_a_supernode_exited_survives_its_superexecs_retries() -> None:
    exited = threading.Event()
    exited.set()
    lines = ["ERROR: Failed to activate SuperNode", "Exit Code: 305",
             *["WARNING: Connection attempt failed, retrying in 1.0 seconds"] * 200]
    tail: deque[str] = deque(maxlen=50)
    relay_output(iter(lines), tail, verbose=False, supernode_exited=exited)
    assert explain_supernode_exit(tail) == ACTIVATION_REFUSED


def test_flowers_exit_message_survives_retries_logged_while_the_supernode_shuts_down() -> None:
    # The SuperNode has said why it exits but has not ended yet: its SuperExec's retries
    # are still relayed (they are only dropped once the SuperNode is gone).
    lines = ["INFO:      Starting Flower SuperNode", "ERROR:     Exit Code: 305",
             "Failed to initialize the connection to the SuperLink.",
             "[code: 2004] No SuperNode found with the given public key",
             *["WARNING: Connection attempt failed, retrying in 0.25 seconds"] * 200]
    tail: deque[str] = deque(maxlen=50)
    last_words: list[str] = []
    relay_output(iter(lines), tail, verbose=False, supernode_exited=threading.Event(),
                 last_words=last_words)
    assert last_words[:3] == lines[1:4] and len(last_words) == site_session.EXIT_MESSAGE_LINES
    ended = SupernodeExit(1, (*last_words, *tail), activated=False)
    assert ended.trouble() == ("refused", ACTIVATION_REFUSED)


def test_activation_is_noticed_however_long_the_supernode_ran_after_it() -> None:
    activated_, exited = threading.Event(), threading.Event()
    tail: deque[str] = deque(maxlen=50)
    lines = ["INFO:      SuperNode ID: 1234567", *["INFO:      [RUN 42]"] * 500]
    relay_output(iter(lines), tail, verbose=False, supernode_exited=exited, activated=activated_)
    assert activated_.is_set() and "SuperNode ID" not in "\n".join(tail)
