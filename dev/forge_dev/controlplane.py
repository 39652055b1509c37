"""A real local Kubernetes control plane on loopback: etcd + kube-apiserver + kube-controller-manager.

Development and test use only. Binaries come from ``scripts/build-control-plane.sh`` (cached under
``~/.cache/forge/k8s-1.20.2/bin``); this module starts them on free loopback ports with data in a
temporary folder, writes a kubeconfig with an admin bearer token, and stops every process it started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from forge_dev.kubeconfig import ClusterAccess, kubeconfig_text, write_kubeconfig

K8S_VERSION = "1.20.2"
PROCESS_NAMES = ("etcd", "kube-apiserver", "kube-controller-manager")
STOP_GRACE_S = 5.0


class ControlPlaneError(RuntimeError):
    """A control-plane component could not be found, started or reached."""


def cache_dir() -> Path:
    """The folder holding Forge's cached builds (``FORGE_CACHE_DIR``, default ``~/.cache/forge``)."""
    return Path(os.environ.get("FORGE_CACHE_DIR", Path.home() / ".cache" / "forge"))


def binary_dir() -> Path:
    return cache_dir() / f"k8s-{K8S_VERSION}" / "bin"


def find_binary(name: str) -> Path:
    """Locate a control-plane binary: the Forge build cache first, then PATH (etcd comes from Debian)."""
    cached = binary_dir() / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    raise ControlPlaneError(
        f"{name} not found in {binary_dir()} or on PATH: run `make control-plane` "
        "(scripts/build-control-plane.sh) first"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class ControlPlane:
    """Starts and stops a local control plane. Use as a context manager or call start()/stop().

    Attributes:
        workdir: where data, certificates, logs and the kubeconfig live; a temporary folder by default,
            removed on stop unless ``keep_workdir`` is set.
        with_controller_manager: also run kube-controller-manager (garbage collection, namespace deletion,
            ServiceAccount tokens).
    """

    workdir: Path | None = None
    with_controller_manager: bool = True
    keep_workdir: bool = False
    ready_timeout_s: float = 60.0
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    apiserver_port: int = 0
    etcd_port: int = 0
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _owns_workdir: bool = False

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self._dir / "kubeconfig"

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise ControlPlaneError("control plane not started")
        return self.workdir

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._processes.items()}

    def log_path(self, component: str) -> Path:
        return self._dir / "logs" / f"{component}.log"

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd, kube-apiserver (and kube-controller-manager); wait until the API server is ready.

        On any failure everything already started is stopped before the error is raised.
        """
        binaries = {name: find_binary(name) for name in PROCESS_NAMES}
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="forge-k8s-"))
            self._owns_workdir = True
        d = self._dir
        (d / "logs").mkdir(parents=True, exist_ok=True)
        (d / "pki").mkdir(exist_ok=True)
        try:
            self._write_credentials()
            self.etcd_port, etcd_peer_port = free_port(), free_port()
            self.apiserver_port = free_port()
            self._spawn(
                "etcd",
                [
                    str(binaries["etcd"]),
                    "--data-dir",
                    str(d / "etcd"),
                    "--listen-client-urls",
                    f"http://127.0.0.1:{self.etcd_port}",
                    "--advertise-client-urls",
                    f"http://127.0.0.1:{self.etcd_port}",
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{etcd_peer_port}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{etcd_peer_port}",
                    "--initial-cluster",
                    f"default=http://127.0.0.1:{etcd_peer_port}",
                    "--quota-backend-bytes",
                    str(2 * 1024**3),
                ],
            )
            self._spawn(
                "kube-apiserver",
                [
                    str(binaries["kube-apiserver"]),
                    f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                    f"--secure-port={self.apiserver_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--cert-dir={d / 'pki'}",
                    f"--token-auth-file={d / 'tokens.csv'}",
                    "--authorization-mode=RBAC",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={d / 'sa.pub'}",
                    f"--service-account-signing-key-file={d / 'sa.key'}",
                    "--api-audiences=https://kubernetes.default.svc",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--insecure-port=0",
                    "--enable-priority-and-fairness=false",
                    "--max-requests-inflight=1000",
                    "--max-mutating-requests-inflight=500",
                ],
            )
            self._wait_ready()
            self._write_kubeconfig()
            if self.with_controller_manager:
                self._spawn(
                    "kube-controller-manager",
                    [
                        str(binaries["kube-controller-manager"]),
                        f"--kubeconfig={self.kubeconfig}",
                        "--controllers=garbagecollector,namespace,serviceaccount-token,serviceaccount",
                        f"--service-account-private-key-file={d / 'sa.key'}",
                        f"--root-ca-file={d / 'pki' / 'apiserver.crt'}",
                        "--leader-elect=false",
                        "--bind-address=127.0.0.1",
                        "--secure-port=0",
                        "--port=0",
                        "--concurrent-gc-syncs=5",
                    ],
                )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process this control plane started, newest first (SIGTERM, then SIGKILL), and clean up.

        One at a time: kube-apiserver shuts down quickly only while etcd is still there to answer it.
        """
        for name in reversed(list(self._processes)):
            proc = self._processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._processes.clear()
        if self._owns_workdir and not self.keep_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_path(name), "wb")  # noqa: SIM115 - the child keeps writing to it
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._processes[name] = proc

    def _write_credentials(self) -> None:
        d = self._dir
        for argv in (
            ["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"],
            ["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
        ):
            done = subprocess.run(argv, capture_output=True, check=False)
            if done.returncode != 0:
                raise ControlPlaneError(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace')}")
        (d / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n")

    def _wait_ready(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        request = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + self.ready_timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            for name, proc in self._processes.items():
                if proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with status {proc.returncode} during start-up; "
                        f"last lines of {self.log_path(name)}:\n{self._tail(name)}"
                    )
            try:
                with urllib.request.urlopen(request, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as error:
                last_error = str(error)
            time.sleep(0.2)
        raise ControlPlaneError(
            f"kube-apiserver not ready after {self.ready_timeout_s:.0f} s ({last_error}); "
            f"last lines of its log:\n{self._tail('kube-apiserver')}"
        )

    def _tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _write_kubeconfig(self) -> None:
        # The API server's self-signed certificate (with its CA) verifies TLS: clients need no insecure mode and
        # print no insecure-request warnings.
        ca_pem = (self._dir / "pki" / "apiserver.crt").read_bytes()
        access = ClusterAccess(server=self.server, ca_pem=ca_pem)
        write_kubeconfig(self.kubeconfig, kubeconfig_text(access, self.token, "default", "admin"))


def running_control_plane_pids() -> list[int]:
    """PIDs of any etcd / kube-apiserver / kube-controller-manager processes on this machine."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if name in {process_name[:15] for process_name in PROCESS_NAMES}:  # comm is cut at 15
            found.append(int(entry.name))
    return found
