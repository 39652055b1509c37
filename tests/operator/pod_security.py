"""The Pod Security Standard "restricted" (Kubernetes pod-security-admission, policy version latest), as a pure check
of a pod spec: the baseline rules plus restricted's own. Written from the published standard, one rule per block."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

ALLOWED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t"}


def _containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod.get(field) or []:
            yield f"{field}[{container.get('name')}]", container


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every rule of "restricted" that the pod spec breaks (empty: it passes)."""
    problems: list[str] = []
    pod_context = pod.get("securityContext") or {}
    # baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field} is true")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl.get('name')} is not a safe sysctl")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            problems.append(f"volume {volume.get('name')}: type {sorted(kinds - ALLOWED_VOLUME_TYPES)} not allowed")
    if (pod_context.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
        problems.append("pod seLinuxOptions.type not allowed")
    # restricted, pod level
    pod_non_root = pod_context.get("runAsNonRoot") is True
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    if pod_context.get("runAsNonRoot") is False:
        problems.append("pod runAsNonRoot is false")
    if pod_context.get("runAsUser") == 0:
        problems.append("pod runAsUser is 0")
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"pod seccompProfile.type {pod_seccomp}")
    for where, container in _containers(pod):
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            problems.append(f"{where}: privileged")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"{where}: hostPort")
        if context.get("procMount") not in (None, "Default"):
            problems.append(f"{where}: procMount {context.get('procMount')}")
        if (context.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
            problems.append(f"{where}: seLinuxOptions.type not allowed")
        capabilities = context.get("capabilities") or {}
        added = set(capabilities.get("add") or [])
        if not added <= BASELINE_CAPABILITIES:
            problems.append(f"{where}: adds capabilities {sorted(added - BASELINE_CAPABILITIES)}")
        # restricted
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where}: capabilities must drop ALL")
        if not added <= {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: may add only NET_BIND_SERVICE")
        non_root = context.get("runAsNonRoot")
        if non_root is False or (non_root is None and not pod_non_root):
            problems.append(f"{where}: runAsNonRoot must be true (container or pod)")
        if context.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser is 0")
        seccomp = (context.get("seccompProfile") or {}).get("type")
        if seccomp is None and pod_seccomp is None:
            problems.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost (container or pod)")
        elif seccomp is not None and seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile.type {seccomp}")
    return problems
