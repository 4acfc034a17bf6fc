"""`pollinate-client`: the one entry point of every site, in a Job, a Helm release or a laptop.

    pollinate-client join --server fl.example.org:443 --site alice-laptop --data notes.jsonl \
        --ca ca.crt --key site.key
    pollinate-client eval --adapter-dir ./v3 --data notes.jsonl

`join` checks its inputs and the connection first (so a wrong CA, a wrong server name or a
missing file fails in seconds with a message that says which), starts the site trainer (the
model loads when the first round asks for it), then runs Flower's SuperNode with Pollinate's
ClientApp until the site is stopped, its key is refused or the server revokes it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .site_health import SiteHealth
from .site_session import SITE_SECRET, Rejoin, Retry, run_supernode
from .site_trainer import SiteOptions, SiteTrainer, TrainerServer, trainer_socket_path
from .supernode import DEFAULT_POLL_SECONDS, HEARTBEAT_ENV, HEARTBEAT_RANGE, POLL_ENV

log = logging.getLogger("pollinate.client")


class JoinError(RuntimeError):
    """A problem the person running the site can fix; printed without a traceback."""


# ---- input checks --------------------------------------------------------------------------
def parse_server(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[?([^\]\s]+?)\]?:(\d{1,5})", address.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise JoinError(f"--server {address!r}: expected host:port, e.g. fl.example.org:443 "
                        "(the Federation's status.endpoint)")
    return match.group(1), int(match.group(2))


def check_file(flag: str, path: Path, what: str) -> None:
    path = path.expanduser()
    if not path.exists():
        raise JoinError(f"{flag} {path}: does not exist; expected {what}")
    if not os.access(path, os.R_OK):
        raise JoinError(f"{flag} {path}: not readable by this user; expected {what}")


def check_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    expected = f"this site's private key, site.key from {SITE_SECRET} (OpenSSH EC P-384)"
    check_file("--key", path, expected)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise JoinError(f"--key {path}: not an OpenSSH private key ({err}); expected {expected}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JoinError(f"--key {path}: an OpenSSH key, but not an EC one ({type(key).__name__}); "
                        f"expected {expected}")


def check_ca(path: Path) -> None:
    expected = f"the Federation's CA certificate (PEM), ca.crt from {SITE_SECRET}"
    check_file("--ca", path, expected)
    try:
        ssl.create_default_context(cafile=str(path.expanduser()))
    except ssl.SSLError as err:
        raise JoinError(f"--ca {path}: not a PEM certificate ({err.reason or err}); "
                        f"expected {expected}") from err


def check_data(path: Path) -> None:
    from .train.data import DataError, data_files  # imports torch: the trainer needs it anyway

    try:
        data_files(path)
    except DataError as err:
        raise JoinError(f"--data {path}: {err}; expected this site's training text as .jsonl "
                        "(one {\"text\": ...} record a line) or .txt files") from err


def check_inputs(args: argparse.Namespace) -> tuple[str, int, Path | None]:
    """Every local input, cheapest first; returns the server's host and port and the CA."""
    host, port = parse_server(args.server)
    if args.poll_seconds is not None and not 0 < args.poll_seconds <= 60:
        raise JoinError(f"--poll-seconds {args.poll_seconds:g}: expected seconds in (0, 60], how "
                        "often an idle site asks the server for work")
    low, high = HEARTBEAT_RANGE
    if args.heartbeat_seconds is not None and not low <= args.heartbeat_seconds <= high:
        raise JoinError(f"--heartbeat-seconds {args.heartbeat_seconds:g}: expected seconds from "
                        f"{low:g} to {high:g}, the range Flower's server accepts")
    for flag, seconds in (("--rejoin-seconds", args.rejoin_seconds),
                          ("--reconnect-seconds", args.reconnect_seconds)):
        if not seconds >= 0:  # also NaN
            raise JoinError(f"{flag} {seconds:g}: expected seconds, 0 or more")
    check_file("--data", Path(args.data), "this site's private training data (a .jsonl or .txt "
               "file, or a folder of them)")
    ca = Path(args.ca) if args.ca else None
    if args.insecure and (ca or args.key):
        raise JoinError("--insecure turns TLS off: do not combine it with --ca or --key")
    if not args.insecure:
        if ca is None:
            raise JoinError(f"--ca is required: the Federation's CA, ca.crt from {SITE_SECRET} "
                            "(--insecure only for local tests)")
        check_ca(ca)
    if args.key:
        check_key(Path(args.key))
    if args.general_eval:
        check_file("--general-eval", Path(args.general_eval), "general held-out text (.jsonl or .txt)")
    check_data(Path(args.data))
    return host, port, ca


def check_connection(host: str, port: int, ca: Path | None, timeout: float = 10.0) -> None:
    """Reach the server and complete a TLS handshake with `ca`, naming what went wrong."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise JoinError(
            f"cannot reach the server at {host}:{port} ({err.strerror or err}); check --server "
            "(the Federation's status.endpoint) and that this machine can reach it "
            "(server running, firewall, VPN)") from err
    if ca is None:
        sock.close()
        return
    context = ssl.create_default_context(cafile=str(ca.expanduser()))
    try:
        with context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as err:
        raise certificate_problem(host, port, ca, err) from err
    except ssl.SSLError as err:
        what = ("does not answer with TLS" if err.reason == "WRONG_VERSION_NUMBER"
                else "failed the TLS handshake")
        raise JoinError(
            f"the server at {host}:{port} {what} ({err.reason or err}); check that --server "
            "names the Federation's TLS endpoint (status.endpoint), not another port") from err
    except OSError as err:
        raise JoinError(f"the server at {host}:{port} closed the connection during the TLS "
                        f"handshake ({err}); check --server (the Federation's status.endpoint)") from err


def certificate_problem(host: str, port: int, ca: Path, err: ssl.SSLCertVerificationError) -> JoinError:
    detail = err.verify_message or str(err)
    if "mismatch" in detail.lower():
        names = ", ".join(certificate_names(host, port)) or "no names"
        return JoinError(
            f"certificate problem: the server's certificate is not valid for {host!r} ({detail}); "
            f"it names {names}: use one of those in --server (the Federation's status.endpoint)")
    if "expired" in detail.lower():
        return JoinError(
            f"certificate problem: the server's certificate has expired ({detail}); the "
            "Federation's operator must renew it (nothing to change on this site)")
    return JoinError(
        f"certificate problem: the server's certificate is not trusted by --ca {ca} ({detail}); "
        f"pass the Federation's CA with --ca: ca.crt from {SITE_SECRET}")


def certificate_names(host: str, port: int, timeout: float = 10.0) -> list[str]:
    """The DNS names and addresses the server's certificate is valid for (read without
    verifying it, only to say which name to use)."""
    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (socket.create_connection((host, port), timeout=timeout) as sock,
              context.wrap_socket(sock, server_hostname=host) as tls):
            der = tls.getpeercert(binary_form=True)
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reporter:
    """Progress for a person at a terminal: a rich progress bar per round (the round's local
    steps and the last loss) between log lines. In a pod (not a TTY) plain log lines only: a bar
    redrawn in a log file is noise."""

    def __init__(self, site: str, stream: TextIO | None = None) -> None:
        self.site = site
        stream = stream if stream is not None else sys.stderr
        self.interactive = stream.isatty()
        self._console: Any = None
        self._bar: Any = None
        self._task: Any = None
        if self.interactive:
            from rich.console import Console
            self._console = Console(file=stream)

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "step":
            if self._bar is not None:
                self._bar.update(self._task, completed=info["step"], total=info["steps"],
                                 loss=f"{info['loss']:.4f}")
            return
        if kind == "loading":
            msg = f"loading base model {info['model']} (kept resident across rounds)"
        elif kind == "training":
            msg = f"round {info['round']}: training on local data"
        elif kind == "refused":
            msg = f"the server refused this site's last reply: {info['why']}"
        elif kind == "trained":
            msg = (f"round {info['round']}: done, train loss {info['loss']:.4f}, "
                   f"{info['seconds']:.1f} s; adapter sent")
        else:
            msg = f"{kind}: {info}"
        self._close_bar()  # a round that failed leaves its bar behind
        if self._console is not None:
            self._console.log(f"[bold]{self.site}[/bold] {msg}")
        else:
            (log.warning if kind == "refused" else log.info)(msg)
        if kind == "training" and self._console is not None:
            self._open_bar(info["round"])

    def _open_bar(self, round_number: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn(f"{self.site} round {round_number}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("steps, loss {task.fields[loss]}"), TimeElapsedColumn(), console=self._console)
        self._task = self._bar.add_task("train", total=None, loss="-")
        self._bar.start()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None


# ---- commands ------------------------------------------------------------------------------
def join(args: argparse.Namespace) -> int:
    host, port, ca = check_inputs(args)
    check_connection(host, port, None if args.insecure else ca)
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    trainer = SiteTrainer(SiteOptions(
        site=args.site, data=Path(args.data), device=args.device, quantization=args.quantization,
        general_eval=Path(args.general_eval) if args.general_eval else None),
        on_event=Reporter(args.site))
    socket_path = trainer_socket_path(work, args.site)
    server = TrainerServer(trainer, socket_path)
    server.start()
    log.info("site %s joining %s:%d (pollinate %s)", args.site, host, port, __version__)
    try:
        env = supernode_env(work)
        if args.poll_seconds is not None:
            env[POLL_ENV] = str(args.poll_seconds)
        if args.heartbeat_seconds is not None:
            env[HEARTBEAT_ENV] = str(args.heartbeat_seconds)
        return run_site(args, supernode_command(args, host, port, ca, socket_path), env,
                        SiteHealth(work))
    finally:
        server.stop()


def supernode_command(args: argparse.Namespace, host: str, port: int, ca: Path | None,
                      socket_path: Path) -> list[str]:
    """Flower's SuperNode command line for this site (paced: see supernode.py): its trainer
    socket in the node config, TLS with the Federation's CA (or --insecure), and the site key
    when it has one."""
    command = [
        sys.executable, "-m", "pollinate_runtime.supernode",
        "--superlink", f"{host}:{port}",
        "--node-config", f'site="{args.site}" trainer-socket="{socket_path}"',
        "--port", str(free_port()),
        "--max-retries", str(args.max_retries),
    ]
    command += ["--insecure"] if args.insecure else ["--root-certificates", str(ca)]
    if args.key:
        command += ["--auth-supernode-private-key", str(args.key)]
    return command


def supernode_env(work: Path) -> dict[str, str]:
    # The SuperNode starts flower-superexec and flwr-clientapp by name: find them beside this
    # interpreter even when its environment is not activated (a laptop's venv, an image).
    bin_dir = str(Path(sys.executable).parent)
    return {
        # The SuperExec the SuperNode starts looks for a message to run every second by
        # default, half a second of every round on average; its poll stays on this machine.
        # Flower's one supported knob for it (flower-1.41-probe.md). Each poll costs CPU in
        # the SuperExec and the SuperNode: measured idle, a site used 5% of a core at 0.1 s
        # and under 2% at 0.25 s (60 s, 2 cores); 0.25 s adds 0.125 s a message on average.
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",
        **os.environ, "FLWR_HOME": str(work / "flwr"), "PYTHONUNBUFFERED": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_site(args: argparse.Namespace, command: list[str], env: dict[str, str],
             health: SiteHealth | None = None) -> int:
    """Run SuperNodes until this site is stopped (0) or the server will not have it (JoinError
    naming why): a lost server or a refused activation starts another (site_session.Rejoin).
    `health`: what the pod's probes read (site_health)."""
    stopping = threading.Event()
    current: list[subprocess.Popen] = []
    activated = threading.Event()
    if health is not None:
        health.beat(stopping)
        watch_activation(activated, health, stopping)

    def stop(signum: int, _frame: object) -> None:
        log.info("stopping (signal %d)", signum)
        stopping.set()
        if current and current[-1].poll() is None:
            current[-1].terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rejoin = Rejoin(args.rejoin_seconds, args.reconnect_seconds)
    while not stopping.is_set():
        activated.clear()
        if health is not None:
            health.update(supernode="starting", connected=False)
        ended = run_supernode(command, env, args.verbose, current, log, activated)
        if health is not None:
            health.update(supernode=f"ended (exit code {ended.code}), rejoining", connected=False)
        if stopping.is_set():
            break
        decision = rejoin.after(ended, time.monotonic())
        if not isinstance(decision, Retry):
            raise JoinError(f"{decision.message} (the SuperNode exited with code {ended.code})"
                            if decision.message else
                            f"the SuperNode exited with code {ended.code}: see the log above "
                            "(run with --verbose for all of it)")
        log.info("%s", decision.why)
        stopping.wait(decision.seconds)
    log.info("site %s left the federation", args.site)
    return 0


def watch_activation(activated: threading.Event, health: SiteHealth, stopping: threading.Event,
                     every: float = 1.0) -> threading.Thread:
    """Report a SuperNode the server activated as connected (readiness), once per start."""
    def watch() -> None:
        # Every `every` seconds: the event stays set while the SuperNode runs, so waiting on
        # it would return at once, over and over (a spinning thread: it was, for a while).
        while not stopping.wait(every):
            connected = activated.is_set()
            if connected != health.state.get("connected"):
                health.update(connected=connected,
                              **({"supernode": "activated by the server"} if connected else {}))

    thread = threading.Thread(target=watch, name="site-activation", daemon=True)
    thread.start()
    return thread


def evaluate(args: argparse.Namespace) -> int:
    """Score an adapter version on local data: perplexity of base model + adapter."""
    import json

    import numpy as np

    check_file("--data", Path(args.data), "data to evaluate on")
    from .train.data import load_eval_blocks
    from .train.device import choose_device
    from .train.local import evaluate as eval_blocks
    from .train.model import LoraSettings, load_adapter_state, load_model

    if args.adapter_dir:
        folder = Path(args.adapter_dir)
        check_file("--adapter-dir", folder / "adapter_config.json", "a PEFT adapter folder")
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        from safetensors.numpy import load_file
        state = load_file(str(folder / "adapter_model.safetensors"))
    else:
        from .store import FederationStore
        if not (args.s3_bucket and args.adapter_version):
            raise JoinError("give --adapter-dir, or --s3-bucket, --s3-prefix and --adapter-version")
        store = FederationStore.connect(args.s3_bucket, args.s3_prefix or "",
                                        endpoint_url=args.s3_endpoint or None)
        published = store.load_adapter(int(args.adapter_version.lstrip("v")))
        adapter_config, state = published.adapter_config, published.adapter
    lora = LoraSettings(rank=int(adapter_config["r"]), alpha=float(adapter_config["lora_alpha"]),
                        dropout=float(adapter_config.get("lora_dropout", 0.0)),
                        target_modules=tuple(adapter_config["target_modules"]))
    base = args.base_model or adapter_config["base_model_name_or_path"]
    from .site_trainer import BUNDLED_MODELS, _in_hub_cache
    if BUNDLED_MODELS.get(base) == "smollm2" and not _in_hub_cache(base):
        from .train.sources import smollm2_path
        base = str(smollm2_path())
    loaded = load_model(base, lora, choose_device(args.device))
    blocks = load_eval_blocks(args.data, loaded.tokenizer, args.sequence_length)
    before, _ = eval_blocks(loaded.model, blocks)  # LoRA B starts at zero: the base model
    load_adapter_state(loaded.model, {k: np.asarray(v) for k, v in state.items()})
    after, ppl = eval_blocks(loaded.model, blocks)
    import math
    print(json.dumps({"blocks": len(blocks), "base_perplexity": math.exp(before),
                      "adapter_perplexity": ppl, "adapter_loss": after}))
    return 0


def keygen(args: argparse.Namespace) -> int:
    """A key pair made here, so the private key never leaves this machine: the private half
    goes to --out (mode 0600, never over an existing file), the public line to stdout, for
    the Federation's `sites[].publicKey`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(args.out).expanduser()
    if out.exists():
        raise JoinError(f"--out {out}: exists; a key is never overwritten (move it away to rotate)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise JoinError(f"--out {out}: cannot create it ({err.strerror})") from err
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    print(f"{public} {args.comment}" if args.comment else public)
    print(f"private key written to {out}; put the line above in the Federation as this site's "
          "publicKey (spec.sites[].publicKey), then join with --key", file=sys.stderr)
    return 0


def prepare_model(args: argparse.Namespace) -> int:
    """Convert the bundled base model (SmolLM2-135M-Instruct, GGUF) now rather than at the first
    round: into the user cache, or with --shipped among the models installed with the runtime,
    where every later process of this installation (an image's pods) finds it read-only."""
    from .train.sources import ModelSourceError, ship_converted, smollm2_gguf, smollm2_path
    try:
        folder = ship_converted(smollm2_gguf()) if args.shipped else smollm2_path()
    except (ModelSourceError, OSError) as err:
        raise JoinError(f"cannot prepare the bundled model: {err}") from err
    print(folder)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pollinate-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pollinate-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    j = sub.add_parser("join", help="join a federation as a site and train when asked")
    j.add_argument("--server", required=True, help="the server's host:port (Federation status.endpoint)")
    j.add_argument("--site", required=True, help="this site's name in the Federation")
    j.add_argument("--data", required=True, help="private training data: .jsonl, .txt or a folder")
    j.add_argument("--ca", help="the Federation's CA certificate (ca.crt)")
    j.add_argument("--key", help="this site's private key (site.key, OpenSSH EC)")
    j.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    j.add_argument("--quantization", default="none", choices=["none", "nf4"])
    j.add_argument("--general-eval", help="general held-out text to measure forgetting on")
    j.add_argument("--work-dir", default=os.environ.get("POLLINATE_WORK_DIR", "~/.cache/pollinate/site"))
    j.add_argument("--max-retries", type=int, default=10, help="SuperNode reconnection attempts")
    j.add_argument("--poll-seconds", type=float, default=None,
                   help=f"how often an idle site asks the server for work (default "
                        f"{DEFAULT_POLL_SECONDS:g}, or {POLL_ENV}; Flower's own is 3)")
    j.add_argument("--heartbeat-seconds", type=float, default=None,
                   help="how often this site tells the server it is alive (10-1800, default "
                        "Flower's 30, or POLLINATE_HEARTBEAT_SECONDS); the server counts it gone, "
                        "and lets a restarted site back in, after two intervals without one")
    j.add_argument("--rejoin-seconds", type=float, default=180,
                   help="how long to retry when the server refuses to activate this site (its "
                        "previous connection counts as online until its heartbeats lapse, "
                        "about 1-2 minutes; an unknown key is refused the same way)")
    j.add_argument("--reconnect-seconds", type=float, default=0,
                   help="how long to keep reconnecting to a server that stopped answering, after "
                        "Flower's own retries (about 1-2 minutes); 0, the default, until stopped")
    j.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    j.add_argument("--verbose", action="store_true")
    k = sub.add_parser("keygen", help="make this site's key pair; print the public key for the Federation")
    k.add_argument("--out", required=True,
                   help="where the private key goes (created 0600, never overwritten)")
    k.add_argument("--comment", default="", help="a label after the public key (e.g. alice@laptop)")
    p = sub.add_parser("prepare-model", help="convert the bundled base model now, not at the first round")
    p.add_argument("--shipped", action="store_true",
                   help="install it with the runtime (an image's build step), not in the user cache")
    h = sub.add_parser("health", help="exit 0 if this site's join is alive (--ready: connected); "
                                       "for its pod's probes")
    h.add_argument("--work-dir", default=os.environ.get("POLLINATE_WORK_DIR", "~/.cache/pollinate/site"))
    h.add_argument("--ready", action="store_true")
    e = sub.add_parser("eval", help="score an adapter version on local data")
    e.add_argument("--data", required=True)
    e.add_argument("--adapter-dir", help="a PEFT adapter folder (adapter_model.safetensors + config)")
    e.add_argument("--s3-bucket")
    e.add_argument("--s3-prefix")
    e.add_argument("--s3-endpoint")
    e.add_argument("--adapter-version", help="adapter version in S3, e.g. v3")
    e.add_argument("--base-model", help="override the base model named in the adapter config")
    e.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    e.add_argument("--sequence-length", type=int, default=256)
    return parser


def health_check(args: argparse.Namespace) -> int:
    from .site_health import main as health_main

    return health_main(["--work-dir", args.work_dir, *(["--ready"] if args.ready else [])])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        commands = {"join": join, "keygen": keygen, "eval": evaluate, "prepare-model": prepare_model,
                    "health": health_check}
        return commands[args.command](args)
    except JoinError as err:
        print(f"pollinate-client: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
