"""Who may join a federation, proven with real processes: a SuperLink with TLS and SuperNode
authentication on loopback, and sites joined with `pollinate-client join` exactly as a laptop
would. A site without the Federation's CA, or dialling a name the server's certificate does
not cover, is stopped before anything leaves it; a key the server does not know is refused;
a key unregistered while the site is connected ends its session within seconds, and a run in
progress goes on without it."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from example_objects import example
from flower_processes import BIN, FlowerServer, Site
from flwr.supercore.fab import Fab
from pollinate_operator import pki
from pollinate_operator.api.federation import FederationSpec
from pollinate_operator.clients.flower import FlowerControl, FlowerRefused
from pollinate_operator.manifests import server as server_manifests
from pollinate_runtime.app_bundle import app_bundle_hash
from pollinate_runtime.run_config import RunConfig, flower_app_pyproject
from pollinate_runtime.site_session import ACTIVATION_REFUSED, REVOKED
from pollinate_runtime.store import FederationStore, RunProgress
from pollinate_testbed import Testbed
from pollinate_testbed.testing import eventually
from tiny_lm import docstring_corpus

# Names the test server's certificate covers: one DNS name (plus 127.0.0.1, which Flower's
# own executor needs); `localhost` is deliberately not among them.
SERVER_NAME = "fl.pollinate.test"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[FlowerServer]:
    """Authentication on, as the operator starts it; no S3: no run starts here."""
    # On every address, so that a caller from another host's address can be played (the gate's
    # tests); sites still dial 127.0.0.1.
    srv = FlowerServer(tmp_path_factory.mktemp("superlink"), env={}, server_names=(SERVER_NAME,),
                       host="0.0.0.0")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notes")
    (folder / "notes.txt").write_text("\n\n".join(docstring_corpus(("textwrap",))) + "\n")
    return folder


def run_to_exit(argv: list[str], log: Path, env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run a site-side command to its end; its exit code and everything it printed. Output
    goes to a file, not a pipe: Flower's SuperExec child would hold a pipe open. Whatever the
    command started is killed afterwards."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env})
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv[0]} still running after {timeout} s:\n{log.read_text()[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # what it started, if any outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, log.read_text(errors="replace")


def join_until_exit(work: Path, *flags: str, timeout: float = 120) -> tuple[int, str]:
    """`pollinate-client join`, without retrying a refused key, run to its end."""
    argv = [str(BIN / "pollinate-client"), "join", "--device", "cpu", "--work-dir", str(work),
            "--rejoin-seconds", "0", *flags]
    return run_to_exit(argv, work / "join.log", {"HF_HUB_OFFLINE": "1"}, timeout)


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("pollinate-client: error:")]
    assert lines, f"no error line in:\n{output[-4000:]}"
    return lines[-1]


def online_sites(server: FlowerServer) -> set[str]:
    with server.control() as control:
        return {n.name for n in control.nodes() if n.status == "online"}


# ---- TLS -----------------------------------------------------------------------------------
def test_join_with_another_ca_stops_at_the_certificate_and_names_the_ca_flag(
        server: FlowerServer, notes: Path, tmp_path: Path) -> None:
    key, _ = server.register("site-other-ca", tmp_path / "keys")
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(pki.new_ca("someone else's CA").cert_pem)
    started = time.monotonic()
    code, output = join_until_exit(
        tmp_path / "work", "--server", server.address, "--site", "site-other-ca",
        "--data", str(notes), "--ca", str(other_ca), "--key", str(key))
    error = error_line(output)
    assert code == 2, output
    assert "certificate problem" in error and f"not trusted by --ca {other_ca}" in error, error
    assert "unable to get local issuer certificate" in error and "ca.crt" in error, error
    assert time.monotonic() - started < 30  # the preflight, not Flower's retries
    assert "site-other-ca" not in online_sites(server)


def test_join_to_a_name_the_certificate_does_not_cover_names_the_names_it_does(
        server: FlowerServer, notes: Path, tmp_path: Path) -> None:
    key, _ = server.register("site-wrong-name", tmp_path / "keys")
    code, output = join_until_exit(
        tmp_path / "work", "--server", f"localhost:{server.port}", "--site", "site-wrong-name",
        "--data", str(notes), "--ca", str(server.ca_path), "--key", str(key))
    error = error_line(output)
    assert code == 2, output
    assert "certificate problem" in error and "not valid for 'localhost'" in error, error
    assert SERVER_NAME in error and "127.0.0.1" in error and "--server" in error, error
    assert "site-wrong-name" not in online_sites(server)


def test_flower_itself_refuses_a_server_its_ca_does_not_sign(
        server: FlowerServer, tmp_path: Path) -> None:
    """Without Pollinate's preflight in front: TLS is enforced by the transport itself."""
    key, _ = server.register("site-bare-supernode", tmp_path / "keys")
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(pki.new_ca("someone else's CA").cert_pem)
    code, output = run_to_exit(
        [str(BIN / "flower-supernode"), "--superlink", server.address, "--root-certificates",
         str(other_ca), "--auth-supernode-private-key", str(key), "--max-retries", "0"],
        tmp_path / "supernode.log", {"FLWR_HOME": str(tmp_path / "flwr")})
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in output, output
    assert "site-bare-supernode" not in online_sites(server)


def test_plain_http_to_the_server_gets_no_answer_and_an_insecure_supernode_cannot_join(
        server: FlowerServer, tmp_path: Path) -> None:
    """The server speaks nothing but TLS: a plain HTTP request is never answered, and Flower's
    own `--insecure` SuperNode, with a registered key, never comes online."""
    context = ssl.create_default_context(cafile=str(server.ca_path))
    with urllib.request.urlopen(f"https://{server.address}/health", context=context, timeout=10) as r:
        assert r.status == 200  # the same port, over TLS
    with pytest.raises((http.client.HTTPException, OSError)):
        urllib.request.urlopen(f"http://{server.address}/health", timeout=10).read()
    key, _ = server.register("site-insecure", tmp_path / "keys")
    code, output = run_to_exit(
        [str(BIN / "flower-supernode"), "--superlink", server.address, "--insecure",
         "--auth-supernode-private-key", str(key), "--max-retries", "0"],
        tmp_path / "supernode.log", {"FLWR_HOME": str(tmp_path / "flwr")})
    assert code != 0, output
    assert "site-insecure" not in online_sites(server)


# ---- the server's gate: control for the operator, runtime for the server -----------------------
def this_machines_address() -> str:
    """An address of this machine that is not loopback: a caller from it is, to the server,
    another host (a site pod, a laptop behind the ingress)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines()]
    assert addresses, f"this machine has no non-loopback IPv4 address: {out!r}"
    return addresses[0]


def raw_call(server: FlowerServer, host: str, raw_path: str, headers: dict[str, str] | None = None,
             ) -> tuple[int, str]:
    """POST `raw_path` byte for byte (no client library normalises it) over TLS from `host`."""
    context = ssl.create_default_context(cafile=str(server.ca_path))
    with socket.create_connection((host, server.port), timeout=20) as sock, \
            context.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
        lines = [f"POST {raw_path} HTTP/1.1", f"Host: {SERVER_NAME}", "Content-Length: 0",
                 "Content-Type: application/protobuf", "Connection: close",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        response.begin()
        return response.status, response.read().decode(errors="replace")


CONTROL_AND_RUNTIME = ["/v1/control/list-runs", "/v1/control/list-nodes", "/v1/control/start-run",
                       "/v1/control/register-node", "/v1/control/unregister-node",
                       "/v1/runtime/acquire-task", "/v1/runtime/get-nodes", "/v1/runtime/pull-messages"]
SPELLINGS = ["/v1/control%2Flist-runs", "/v1/%63ontrol/list-runs", "/v1/fleet/../control/list-runs",
             "/v1/fleet/%2e%2e/control/list-runs", "/v1//control/list-runs", "//v1/control/list-runs",
             "/v1/control/list-runs/", "/V1/CONTROL/LIST-RUNS", "/v1/Control/list-runs",
             "/v1/fleet/./../runtime/acquire-task", "/v1/runtime%2facquire-task"]


def test_no_control_or_runtime_call_from_another_host_reaches_flower(server: FlowerServer) -> None:
    """The confirmed hole: list-runs, list-nodes and acquire-task answered 200 to anyone."""
    host = this_machines_address()
    for path in CONTROL_AND_RUNTIME:
        status, body = raw_call(server, host, path)
        assert status in (401, 403) and body.startswith("pollinate server:"), (path, status, body)
        # A token that is not the operator's is refused too, and opens no runtime call.
        status, _ = raw_call(server, host, path, {"Authorization": "Bearer not-the-operators"})
        assert status == 403, (path, status)
    for path in SPELLINGS:
        for headers in ({}, {"Authorization": f"Bearer {server.control_token}"}):
            status, body = raw_call(server, host, path, headers)
            assert status == 400 and "canonical form" in body, (path, status, body)
    # Each refusal is in the server's log with the caller's address.
    log = server.log.read_text()
    assert f'"peer": "{host}"' in log and '"reason": "not-local"' in log
    assert server.control_token not in log


def test_the_operators_token_opens_the_control_api_and_nothing_else(server: FlowerServer) -> None:
    host = this_machines_address()
    status, body = raw_call(server, host, "/v1/control/list-runs",
                            {"Authorization": f"Bearer {server.control_token}"})
    assert not body.startswith("pollinate server:"), (status, body)  # Flower answered
    with server.control() as control:  # the operator's client, as the operator uses it
        control.list_runs()
    guessed = FlowerControl(server.address, server.ca_path.read_bytes(), "stolen-or-guessed")
    with pytest.raises(FlowerRefused, match="refused the operator's control token"), guessed:
        guessed.list_runs()
    # From loopback too: the control API needs the token wherever the caller is.
    status, _ = raw_call(server, "127.0.0.1", "/v1/control/list-nodes")
    assert status == 401
    # The runtime API is the server's own: its processes reach it over loopback.
    status, body = raw_call(server, "127.0.0.1", "/v1/runtime/get-nodes")
    assert not body.startswith("pollinate server:"), (status, body)
    # Sites use the fleet API from anywhere (Flower checks their keys).
    status, body = raw_call(server, host, "/v1/fleet/get-run")
    assert not body.startswith("pollinate server:"), (status, body)


# ---- SuperNode authentication ----------------------------------------------------------------
def test_a_federation_that_does_not_mention_node_authentication_requires_site_keys() -> None:
    spec = example("federation")["spec"]
    spec["server"].pop("nodeAuthentication", None)
    args = server_manifests.superlink_args(FederationSpec.model_validate(spec), 9092)
    assert "--enable-supernode-auth" in args  # what the `server` fixture runs with


def test_a_key_the_server_does_not_know_is_refused(
        server: FlowerServer, notes: Path, tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_bytes(pki.new_site_key().private_openssh)
    key.chmod(0o600)
    code, output = join_until_exit(
        tmp_path / "work", "--server", server.address, "--site", "site-unknown",
        "--data", str(notes), "--ca", str(server.ca_path), "--key", str(key))
    assert code == 2, output
    assert ACTIVATION_REFUSED in error_line(output)
    assert "not registered" in error_line(output) and "--key" in error_line(output)
    assert "No SuperNode found with the given public key" in server.log.read_text()


def test_a_site_without_a_key_is_refused(server: FlowerServer, notes: Path, tmp_path: Path) -> None:
    code, output = join_until_exit(
        tmp_path / "work", "--server", server.address, "--site", "site-keyless",
        "--data", str(notes), "--ca", str(server.ca_path))
    assert code == 2, output
    assert "requires a registered site key: pass --key" in error_line(output)


def test_unregistering_a_connected_site_ends_its_session_and_its_key_stays_refused(
        server: FlowerServer, notes: Path, tmp_path: Path) -> None:
    key, node_id = server.register("site-revoked", tmp_path / "keys")
    site = Site("site-revoked", notes, tmp_path / "site", key)
    site.join(server, "--rejoin-seconds", "0")
    try:
        eventually(lambda: "site-revoked" in online_sites(server), timeout=120, what="site online")
        with server.control() as control:
            control.unregister_site(node_id)
        revoked = time.monotonic()
        assert site.proc is not None
        try:
            site.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"join still running 60 s after its key was unregistered:\n{site.output()[-3000:]}")
        ended_after = time.monotonic() - revoked
        assert site.proc.returncode == 2, site.output()
        assert REVOKED in error_line(site.output())
        assert ended_after < 30, f"the revoked site stayed connected for {ended_after:.0f} s"
        with server.control() as control:
            (node,) = [n for n in control.nodes() if n.node_id == node_id]
        assert node.status == "unregistered"
    finally:
        site.kill()
    code, output = join_until_exit(
        tmp_path / "again", "--server", server.address, "--site", "site-revoked",
        "--data", str(notes), "--ca", str(server.ca_path), "--key", str(key))
    assert code == 2 and ACTIVATION_REFUSED in error_line(output), output


# ---- a revoked site during a run -------------------------------------------------------------
SITE_TEXTS = {"site-a": ("pathlib", "shutil"), "site-b": ("datetime", "calendar"), "site-c": ("re", "string")}


@pytest.fixture(scope="module")
def run_server(testbed: Testbed, tmp_path_factory) -> Iterator[FlowerServer]:
    s3 = testbed.s3()
    srv = FlowerServer(tmp_path_factory.mktemp("run-superlink"),
                       env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    srv.start()
    yield srv
    srv.stop()


def start_foreign_run(server: FlowerServer, config: RunConfig, marker: Path) -> tuple[int, str]:
    """A run whose app bundle is not Pollinate's, started with the operator's credential (so
    the server gate lets it through): its ClientApp, were a site to import it, would write
    `marker`. Returns the run id and the bundle's sha256."""
    from flwr.cli.build import build_fab_from_files
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=no-name-in-module

    # Pollinate's own bundle with the client app swapped: everything else as the server expects.
    pyproject = flower_app_pyproject().replace('name = "pollinate"', 'name = "evil"').replace(
        'clientapp = "pollinate_runtime.client_app:app"', 'clientapp = "evil_client:app"')
    assert 'clientapp = "evil_client:app"' in pyproject
    evil = (f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from flwr.clientapp import ClientApp\napp = ClientApp()\n")
    content, _ = build_fab_from_files({"pyproject.toml": pyproject.encode(), "evil_client.py": evil.encode()})
    fab_hash = hashlib.sha256(content).hexdigest()
    with server.control() as control:
        response = control._call("StartRun", StartRunRequest(
            fab=fab_to_proto(Fab(fab_hash, content, {})),
            override_config=user_config_to_proto(config.to_flower()), federation=""))
    return int(response.run_id), fab_hash


def progress(testbed: Testbed, name: str) -> RunProgress | None:
    s3 = testbed.s3()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", s3.access_key)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    store = FederationStore.connect(s3.bucket, "security-tests", endpoint_url=s3.endpoint)
    return store.read_progress(name)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_site_revoked_during_a_run_takes_no_part_in_later_rounds(
        testbed: Testbed, run_server: FlowerServer, tiny_model_dir: Path, tmp_path: Path) -> None:
    sites: dict[str, Site] = {}
    node_ids: dict[str, str] = {}
    for site, modules in SITE_TEXTS.items():
        (tmp_path / "data" / site).mkdir(parents=True)
        (tmp_path / "data" / site / "notes.txt").write_text("\n\n".join(docstring_corpus(modules)))
        key, node_ids[site] = run_server.register(site, tmp_path / "keys")
        sites[site] = Site(site, tmp_path / "data" / site, tmp_path / site, key)
        sites[site].join(run_server, "--rejoin-seconds", "0")
    try:
        eventually(lambda: set(SITE_TEXTS) <= online_sites(run_server), timeout=180, what="sites online")
        s3 = testbed.s3()
        name = f"revoked-{int(time.time() * 1000) % 10**9}"
        config = RunConfig(
            training_round=name, base_model=str(tiny_model_dir), lora_rank=4, lora_alpha=8.0,
            lora_dropout=0.0, rounds=4, min_sites=2, local_max_steps=4, batch_size=4,
            sequence_length=64, learning_rate=5e-3,
            # The round under way when site-c is revoked may wait out its timeout for site-c's
            # reply: 60 s, several times what a round of the tiny model takes on a busy CI.
            round_timeout_seconds=60,
            s3_bucket=s3.bucket, s3_prefix="security-tests", s3_endpoint=s3.endpoint,
            sites=tuple(SITE_TEXTS), site_nodes={s: int(n) for s, n in node_ids.items()})

        # First a run carrying a bundle other than Pollinate's: every site refuses it, naming
        # both hashes, runs none of it, and stays connected for the run after it.
        marker = tmp_path / "foreign-client-app-ran"
        foreign_id, foreign_hash = start_foreign_run(run_server, config.replace(
            training_round=f"foreign-{name}"), marker)
        state = run_server.wait_run(foreign_id, timeout=300)
        assert (state.status, state.sub_status) == ("finished", "failed"), state
        assert "no site answered" in state.details, state
        assert not marker.exists(), "a site ran the foreign bundle's client app"
        for site in sites.values():
            assert f"refused run {foreign_id}" in site.output() and foreign_hash in site.output()
            assert app_bundle_hash() in site.output()
        assert set(SITE_TEXTS) <= online_sites(run_server)

        run_id = run_server.start_run(config)

        def first_round_done() -> int | None:
            p = progress(testbed, name)
            return p.round if p and p.round >= 1 else None

        revoked_after = eventually(first_round_done, timeout=600, interval=0.2, what="round 1 done")
        with run_server.control() as control:
            control.unregister_site(node_ids["site-c"])
        state = run_server.wait_run(run_id, timeout=900)
        assert (state.status, state.sub_status) == ("finished", "completed"), state
        final = progress(testbed, name)
        assert final is not None and final.phase == "Succeeded", final
        trained = {r["round"]: set(r.get("examples", {})) for r in final.rounds if r["round"] > 0}
        assert trained[1] == set(SITE_TEXTS), trained
        # The round under way when the key was unregistered may have sent site-c its message
        # (it then cannot answer: its session is gone); every round after it leaves site-c out.
        later = {k: v for k, v in trained.items() if k > revoked_after + 1}
        assert later and all(v == {"site-a", "site-b"} for v in later.values()), trained
        assert sites["site-c"].proc is not None and sites["site-c"].proc.poll() == 2
        assert REVOKED in error_line(sites["site-c"].output())
    finally:
        for joined in sites.values():
            joined.stop()
