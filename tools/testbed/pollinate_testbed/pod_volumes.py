"""A pod's volumes as folders on the host, and the bind mounts that put them at mountPath.

Each volume becomes a host folder: Secrets, ConfigMaps, downward-API and projected volumes
are written out (keys as files, honouring items and modes) under the pod's folder; an
emptyDir is an empty folder there; a hostPath is the path itself; a persistentVolumeClaim
is a folder per claim under the agent's state dir (`claims/<namespace>/<claim>`), kept
across pods, so data put there before a Job runs is what its pods read.

Containers see them at their mountPaths through bind mounts made inside the container's own
mount namespace (see pod_runtime.py), never on the host. Written once at pod start: later
changes to a Secret or ConfigMap do not reach running pods, and tokens are not refreshed.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .kube_api import ApiError, KubeApi
from .pod_config import ContainerConfigError, ObjectSource, field_value

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN_SECONDS = 3607
# Written with kubelet's modes: Secrets and ConfigMaps 0644 unless the pod says otherwise.
DEFAULT_MODE = 0o644
READ_ONLY_KINDS = ("secret", "configMap", "projected", "downwardAPI")


class VolumeError(RuntimeError):
    """A volume cannot be set up yet (kubelet's FailedMount)."""


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


def claim_dir(agent_dir: Path, namespace: str, claim: str) -> Path:
    return agent_dir / "claims" / namespace / claim


class PodVolumes:
    def __init__(self, api: KubeApi, pod: dict, pod_dir: Path, agent_dir: Path) -> None:
        self.api = api
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self.root = pod_dir / "volumes"
        self.agent_dir = agent_dir
        self.sources: dict[str, Path] = {}
        self.kinds: dict[str, str] = {}

    def prepare(self) -> None:
        """Write every volume of the pod; raises VolumeError naming the first that fails."""
        objects = ObjectSource(self.api, self.namespace)
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            kind = next((k for k in volume if k != "name"), "")
            try:
                self.sources[name] = self._prepare(name, kind, volume[kind] or {}, objects)
            except (ContainerConfigError, ApiError, OSError) as err:
                raise VolumeError(f'MountVolume.SetUp failed for volume "{name}": {err}') from err
            self.kinds[name] = kind

    def mounts(self, container: dict) -> list[Mount]:
        """The container's volumeMounts, parents before children."""
        mounts = []
        for vm in container.get("volumeMounts") or []:
            name = vm["name"]
            if name not in self.sources:
                raise VolumeError(f'container "{container["name"]}" mounts unknown volume "{name}"')
            source = self.sources[name]
            if vm.get("subPath"):
                source = source / vm["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            kind = self.kinds[name]
            source_spec = next(v for v in self.pod["spec"]["volumes"] if v["name"] == name)[kind] or {}
            read_only = (bool(vm.get("readOnly")) or kind in READ_ONLY_KINDS
                         or bool(source_spec.get("readOnly")))
            mounts.append(Mount(source, vm["mountPath"], read_only))
        return sorted(mounts, key=lambda m: len(PurePosixPath(m.target).parts))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- one volume ------------------------------------------------------------------
    def _prepare(self, name: str, kind: str, spec: dict, objects: ObjectSource) -> Path:
        folder = self.root / name
        if kind == "emptyDir":
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        if kind == "hostPath":
            return _host_path(spec)
        if kind == "persistentVolumeClaim":
            claim = claim_dir(self.agent_dir, self.namespace, spec["claimName"])
            claim.mkdir(parents=True, exist_ok=True)
            return claim
        if kind in ("secret", "configMap"):
            ref_name = spec.get("secretName") if kind == "secret" else spec.get("name")
            values = objects.data("Secret" if kind == "secret" else "ConfigMap", ref_name,
                                  bool(spec.get("optional")))
            _write_keys(folder, values or {}, spec.get("items"), spec.get("defaultMode", DEFAULT_MODE),
                        f"{kind} {ref_name}")
            return folder
        if kind == "downwardAPI":
            self._write_downward(folder, spec.get("items") or [], spec.get("defaultMode", DEFAULT_MODE))
            return folder
        if kind == "projected":
            folder.mkdir(parents=True, exist_ok=True)
            mode = spec.get("defaultMode", DEFAULT_MODE)
            for source in spec.get("sources") or []:
                self._write_projection(folder, source, mode, objects)
            return folder
        raise VolumeError(f"volume kind {kind!r} is not supported by the node agent "
                          "(supported: emptyDir, hostPath, persistentVolumeClaim, secret, "
                          "configMap, downwardAPI, projected)")

    def _write_projection(self, folder: Path, source: dict, mode: int, objects: ObjectSource) -> None:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            _write_file(folder / token["path"], self._token(token).encode(), mode)
        elif "secret" in source or "configMap" in source:
            kind = "secret" if "secret" in source else "configMap"
            spec = source[kind]
            values = objects.data("Secret" if kind == "secret" else "ConfigMap", spec["name"],
                                  bool(spec.get("optional")))
            _write_keys(folder, values or {}, spec.get("items"), mode, f"{kind} {spec['name']}")
        elif "downwardAPI" in source:
            self._write_downward(folder, source["downwardAPI"].get("items") or [], mode)
        else:
            raise VolumeError(f"projected source {sorted(source)} is not supported")

    def _write_downward(self, folder: Path, items: list[dict], mode: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for item in items:
            if "fieldRef" not in item:
                raise VolumeError(f"downwardAPI item {item['path']}: only fieldRef is supported")
            value = field_value(self.pod, item["fieldRef"]["fieldPath"])
            _write_file(folder / item["path"], value.encode(), item.get("mode", mode))

    def _token(self, spec: dict) -> str:
        """A token bound to this pod from the TokenRequest API, as kubelet asks for it."""
        meta = self.pod["metadata"]
        account = self.pod["spec"].get("serviceAccountName") or "default"
        request: dict = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": spec.get("expirationSeconds", SERVICE_ACCOUNT_TOKEN_SECONDS),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                   "uid": meta["uid"]},
            },
        }
        if spec.get("audience"):
            request["spec"]["audiences"] = [spec["audience"]]
        response = self.api.create(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", request)
        return response["status"]["token"]


def _host_path(spec: dict) -> Path:
    path = Path(spec["path"])
    kind = spec.get("type", "")
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate" and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    elif kind == "Directory" and not path.is_dir():
        raise VolumeError(f"hostPath type check failed: {path} is not a directory")
    elif kind == "File" and not path.is_file():
        raise VolumeError(f"hostPath type check failed: {path} is not a file")
    elif not path.exists() and kind not in ("", "DirectoryOrCreate", "FileOrCreate"):
        raise VolumeError(f"hostPath {path} does not exist")
    return path


def _write_keys(folder: Path, values: dict[str, bytes], items: list[dict] | None, mode: int,
                what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if items:
        for item in items:
            if item["key"] not in values:
                raise VolumeError(f"{what} has no key {item['key']!r}")
            _write_file(folder / item["path"], values[item["key"]], item.get("mode", mode))
    else:
        for key, value in values.items():
            _write_file(folder / key, value, mode)


def _write_file(path: Path, content: bytes, mode: int) -> None:
    if ".." in PurePosixPath(str(path)).parts:
        raise VolumeError(f"refusing a volume path with '..': {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.chmod(tmp, mode)
    tmp.replace(path)
