"""What a container is started with: its environment and its expanded command line.

Follows kubelet: variables in the order Service links, envFrom, env; `valueFrom` resolved
against Secrets, ConfigMaps and the pod's own fields; `$(VAR)` expanded in values, command
and args from the variables defined before it, `$$(VAR)` escaping to a literal `$(VAR)`.
A missing Secret or key that is not optional is a CreateContainerConfigError.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping

from .kube_api import ApiError, KubeApi

# Variables of the agent itself that a container sees: where commands resolve, and the
# OpenBLAS workarounds some processors of this workplace need for numpy not to crash.
INHERITED_VARIABLES = ("PATH", "LANG", "LC_ALL", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ContainerConfigError(RuntimeError):
    """The container cannot be configured yet (kubelet's CreateContainerConfigError)."""


def expand(text: str, variables: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return variables.get(name, match.group(0))

    return _REFERENCE.sub(replace, text)


class ObjectSource:
    """Secrets and ConfigMaps of one namespace, each fetched once per container start."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self._cache: dict[tuple[str, str], dict | None] = {}

    def data(self, kind: str, name: str, optional: bool = False) -> dict[str, bytes] | None:
        """A Secret's or ConfigMap's keys as bytes; None if it is optional and missing."""
        key = (kind, name)
        if key not in self._cache:
            plural = "secrets" if kind == "Secret" else "configmaps"
            try:
                self._cache[key] = self.api.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
            except ApiError as err:
                if not err.not_found:
                    raise
                self._cache[key] = None
        obj = self._cache[key]
        if obj is None:
            if optional:
                return None
            raise ContainerConfigError(f'{kind.lower()} "{name}" not found')
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        values = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        values.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return values

    def value(self, kind: str, ref: dict) -> str | None:
        optional = bool(ref.get("optional"))
        values = self.data(kind, ref["name"], optional)
        if values is None:
            return None
        if ref["key"] not in values:
            if optional:
                return None
            raise ContainerConfigError(f'couldn\'t find key {ref["key"]} in {kind} '
                                       f'{self.namespace}/{ref["name"]}')
        return values[ref["key"]].decode()


def field_value(pod: dict, path: str) -> str:
    """A downward-API fieldRef: metadata.name, status.podIP, metadata.labels['app'], ..."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    simple: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: meta["name"],
        "metadata.namespace": lambda: meta["namespace"],
        "metadata.uid": lambda: meta["uid"],
        "spec.nodeName": lambda: spec.get("nodeName", ""),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", ""),
        "status.podIP": lambda: status.get("podIP", ""),
        "status.podIPs": lambda: ",".join(p["ip"] for p in status.get("podIPs", [])),
        "status.hostIP": lambda: status.get("hostIP", ""),
        "status.hostIPs": lambda: ",".join(p["ip"] for p in status.get("hostIPs", [])),
    }
    if path in simple:
        return simple[path]()
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return meta.get(match.group(1), {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ContainerConfigError(f"unsupported fieldRef fieldPath {path!r}")


def resource_value(container: dict, ref: dict, node_allocatable: Mapping[str, str]) -> str:
    """A resourceFieldRef: the container's limit (or request), else what the node has."""
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    resources = container.get("resources", {})
    value = resources.get(kind, {}).get(name) or node_allocatable.get(name, "0")
    divisor = ref.get("divisor", "1")
    if name == "cpu":
        cores = _quantity(value)
        return str(max(1, -(-int(cores * 1000) // int(_quantity(divisor) * 1000))))
    return str(int(_quantity(value) // _quantity(divisor)))


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12, "m": 1e-3}


def _quantity(text: str) -> float:
    for suffix, factor in _SUFFIXES.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def container_environment(
    pod: dict, container: dict, objects: ObjectSource, service_env: Mapping[str, str],
    inherited: Mapping[str, str], node_allocatable: Mapping[str, str],
) -> dict[str, str]:
    env: dict[str, str] = {k: v for k, v in inherited.items() if k in INHERITED_VARIABLES}
    env["HOSTNAME"] = pod["spec"].get("hostname") or pod["metadata"]["name"]
    env.setdefault("HOME", "/root")
    if pod["spec"].get("enableServiceLinks", True):
        env.update(service_env)
    else:
        env.update({k: v for k, v in service_env.items() if k.startswith("KUBERNETES_")})
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        ref = source.get("secretRef") or source.get("configMapRef")
        kind = "Secret" if "secretRef" in source else "ConfigMap"
        values = objects.data(kind, ref["name"], bool(ref.get("optional")))
        for key, value in (values or {}).items():
            env[prefix + key] = value.decode()
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        value: str | None
        if "secretKeyRef" in source:
            value = objects.value("Secret", source["secretKeyRef"])
        elif "configMapKeyRef" in source:
            value = objects.value("ConfigMap", source["configMapKeyRef"])
        elif "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            value = resource_value(container, source["resourceFieldRef"], node_allocatable)
        else:
            raise ContainerConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def command_line(container: dict, env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expanded. The image is never looked at: without a
    command there is nothing this agent could run, and saying so beats guessing."""
    command = container.get("command") or []
    if not command:
        raise ContainerConfigError(
            f'container "{container["name"]}" has no command: the node agent runs the command '
            f'and args of a container on the host and cannot know the entrypoint of image '
            f'"{container.get("image", "")}"')
    return [expand(part, env) for part in [*command, *(container.get("args") or [])]]
