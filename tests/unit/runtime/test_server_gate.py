"""The server's gate: who may call the control, runtime and fleet APIs, for every spelling of
a path (the real server behind it: tests/integration/test_server_gate.py)."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest
from flwr.superlink import main as flower_app
from pollinate_runtime import server_gate, server_metrics, superlink
from pollinate_runtime.server_gate import Api, ServerGate, decide

TOKEN = "operator-token-0123456789"
SITE = "10.0.3.7"  # a site pod's address
LOCAL = "127.0.0.1"


@pytest.mark.parametrize("path, api", [
    ("/health", Api.HEALTH),
    ("/v1/fleet/pull-messages", Api.FLEET),
    ("/v1/control/start-run", Api.CONTROL),
    ("/v1/runtime/acquire-task", Api.RUNTIME),
    ("/docs", Api.OTHER),
    ("/openapi.json", Api.OTHER),
    ("/v1/fleetx/pull-messages", Api.OTHER),
    ("/v1/fleet", Api.OTHER),
])
def test_a_canonical_path_belongs_to_one_api(path: str, api: Api) -> None:
    assert server_gate.classify(path) is api


def test_fleet_calls_and_health_pass_for_anyone() -> None:
    for path in ("/v1/fleet/pull-messages", "/v1/fleet/register-node", "/health"):
        assert decide(path, SITE, None, TOKEN)[1] is None
        assert decide(path, None, None, None)[1] is None


@pytest.mark.parametrize("peer", [SITE, LOCAL, None])
def test_control_calls_need_the_operators_token_from_anywhere(peer: str | None) -> None:
    assert decide("/v1/control/list-runs", peer, TOKEN, TOKEN) == (Api.CONTROL, None)
    _, missing = decide("/v1/control/list-runs", peer, None, TOKEN)
    assert missing and missing.status == 401 and "control token" in missing.message
    _, wrong = decide("/v1/control/list-runs", peer, TOKEN + "x", TOKEN)
    assert wrong and wrong.status == 403 and wrong.reason == "wrong-credential"


def test_a_server_without_a_token_refuses_every_control_call() -> None:
    for presented in (None, "", "anything"):
        _, refusal = decide("/v1/control/start-run", LOCAL, presented or None, None)
        assert refusal is not None


@pytest.mark.parametrize("path", ["/v1/runtime/acquire-task", "/v1/runtime/pull-task-input",
                                  "/docs", "/openapi.json"])
def test_runtime_and_everything_else_only_from_the_servers_own_processes(path: str) -> None:
    assert decide(path, LOCAL, None, TOKEN)[1] is None
    assert decide(path, "::1", None, TOKEN)[1] is None
    assert decide(path, "::ffff:127.0.0.1", None, TOKEN)[1] is None
    for peer in (SITE, "192.0.2.2", "::ffff:10.0.3.7", "fd00::2", None, "localhost", ""):
        _, refusal = decide(path, peer, None, TOKEN)
        assert refusal and refusal.status == 403 and refusal.reason == "not-local", peer
    # The operator's token does not open the runtime API: it is the server's own.
    assert decide("/v1/runtime/acquire-task", SITE, TOKEN, TOKEN)[1] is not None


@pytest.mark.parametrize("raw_path", [
    "/v1/control%2Flist-runs", "/v1/%63ontrol/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/../control/list-runs", "/v1/fleet/./pull-messages", "/v1//control/list-runs",
    "//v1/control/list-runs", "/v1/control/list-runs/", "/V1/CONTROL/list-runs",
    "/v1/Control/list-runs", "/v1/runtime/acquire-task;x", "/v1/fleet/pull-messages\\..\\x",
    "/v1/fleet/pull messages", "", "v1/control/list-runs", "/v1/fleet/..",
])
def test_every_other_spelling_of_a_path_is_refused_before_it_is_classified(raw_path: str) -> None:
    # Even with the operator's token and from loopback: a spelling that a router might read
    # as another path is never passed on.
    _, refusal = decide(raw_path, LOCAL, TOKEN, TOKEN)
    assert refusal is not None and refusal.status == 400 and refusal.reason == "non-canonical-path"


@pytest.mark.parametrize("header, token", [
    (f"Bearer {TOKEN}", TOKEN), (f"bearer {TOKEN}", TOKEN), (f"Bearer  {TOKEN} ", TOKEN),
    ("Basic dXNlcjpwYXNz", None), ("Bearer", None), ("Bearer ", None), (None, None), ("", None),
])
def test_the_token_is_read_only_from_a_bearer_header(header: str | None, token: str | None) -> None:
    assert server_gate.bearer_token(header) == token


def test_the_token_file_is_read_at_each_call_and_missing_means_none(tmp_path: Path) -> None:
    path = tmp_path / "token"
    assert server_gate.read_token(path) is None
    path.write_text("\n")
    assert server_gate.read_token(path) is None
    path.write_text(f"{TOKEN}\n")
    assert server_gate.read_token(path) == TOKEN
    assert server_gate.read_token(None) is None


# ------------------------------------------------------------------------------ the middleware

class Recorder:
    """Flower's app as the gate sees it: records what reached it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        self.seen.append(scope.get("path", scope["type"]))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"flower"})


def call(gate: ServerGate, raw_path: bytes, peer: str, headers: dict[str, str] | None = None,
         ) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": raw_path.decode("latin-1"), "raw_path": raw_path,
             "client": (peer, 40000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(gate(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_the_gate_passes_allowed_calls_and_answers_refused_ones_itself(tmp_path: Path, caplog) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    app = Recorder()
    gate = ServerGate(app, token_file)
    assert call(gate, b"/v1/fleet/pull-messages", SITE) == (200, b"flower")
    operator = {"Authorization": f"Bearer {TOKEN}"}
    assert call(gate, b"/v1/control/list-runs", SITE, operator) == (200, b"flower")
    status, body = call(gate, b"/v1/control/list-runs", SITE)
    assert status == 401 and b"control token" in body
    status, body = call(gate, b"/v1/runtime/acquire-task", SITE)
    assert status == 403 and b"only to the server's own processes" in body
    status, _ = call(gate, b"/v1/%63ontrol/list-runs", SITE, operator)
    assert status == 400
    assert app.seen == ["/v1/fleet/pull-messages", "/v1/control/list-runs"]
    # Each refusal is logged with its peer and reason; no token ever is.
    refusals = [r.getMessage() for r in caplog.records if r.name == "pollinate.server_gate"]
    assert len(refusals) == 3 and all(SITE in line for line in refusals)
    assert not any(TOKEN in r.getMessage() for r in caplog.records)


def test_a_rotated_token_takes_effect_at_the_next_call(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    gate = ServerGate(Recorder(), token_file)
    token_file.write_text("rotated-token")
    assert call(gate, b"/v1/control/list-runs", SITE, {"Authorization": f"Bearer {TOKEN}"})[0] == 403
    assert call(gate, b"/v1/control/list-runs", SITE, {"Authorization": "Bearer rotated-token"})[0] == 200


def test_refusals_are_counted_by_api_and_reason(tmp_path: Path) -> None:
    gate = ServerGate(Recorder(), None)
    counter = server_metrics.REFUSED_REQUESTS.labels("runtime", "not-local")
    before = counter._value.get()
    call(gate, b"/v1/runtime/acquire-task", SITE)
    assert counter._value.get() == before + 1


def test_lifespan_events_reach_flower_untouched() -> None:
    app = Recorder()

    async def run() -> None:
        await ServerGate(app, None)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]

    asyncio.run(run())
    assert app.seen == ["lifespan"]


# ------------------------------------------------------------------------- pollinate-superlink

def test_flowers_app_is_built_behind_the_gate(tmp_path: Path, monkeypatch) -> None:
    module = types.ModuleType("flower_main")
    module.create_app = lambda *a, **k: ("flower app", a, k)  # type: ignore[attr-defined]
    superlink.put_behind_gate(module, tmp_path / "token")
    gated = module.create_app("config", lifespan="x")
    assert isinstance(gated, ServerGate)
    assert gated.app == ("flower app", ("config",), {"lifespan": "x"})
    assert gated.token_file == tmp_path / "token"


def test_the_pinned_flower_builds_its_app_where_the_gate_hooks_in() -> None:
    # pollinate-superlink replaces flwr.superlink.main.create_app; if Flower moves it, this fails
    # (and put_behind_gate refuses to start the server) rather than serving an ungated app.
    assert callable(flower_app.create_app)
    with pytest.raises(RuntimeError, match="no longer has create_app"):
        superlink.put_behind_gate(types.ModuleType("moved"), None)


def test_the_token_file_comes_from_the_environment() -> None:
    assert superlink.control_token_file({}) is None
    assert superlink.control_token_file({"POLLINATE_CONTROL_TOKEN_FILE": " "}) is None
    assert superlink.control_token_file({"POLLINATE_CONTROL_TOKEN_FILE": "/etc/t"}) == Path("/etc/t")
