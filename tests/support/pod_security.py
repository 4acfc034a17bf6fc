"""What the restricted Pod Security Standard asks of a pod that tests check on live pods."""

from __future__ import annotations


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod's spec falls short of non-root, read-only, no escalation, no capabilities."""
    spec, name = pod["spec"], pod["metadata"]["name"]
    pod_context = spec.get("securityContext") or {}
    problems = []
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        problems.append(f"{name}: shares a host namespace")
    for container in spec.get("initContainers", []) + spec["containers"]:
        where = f"{name}/{container['name']}"
        context = container.get("securityContext") or {}
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser", 0)) == 0:
            problems.append(f"{where}: runs as uid 0")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: privilege escalation is not disabled")
        if context.get("privileged"):
            problems.append(f"{where}: privileged")
        capabilities = context.get("capabilities") or {}
        if capabilities.get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities not all dropped: {capabilities.get('drop')}")
        if capabilities.get("add"):
            problems.append(f"{where}: adds capabilities {capabilities['add']}")
    return problems
