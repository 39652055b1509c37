"""`make demo`: run Forge on a local embedded setup.

Starts a real local control plane, installs the CRDs, applies the example ForgeJob and shows it with
`kubectl get forgejobs`, then stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from forge_dev.controlplane import ControlPlane
from forge_dev.crds import install_crds, minimal_pytorchjob_crd_path

DEMO_MANIFEST = Path("examples/demo-forgejob.yaml")


def pytorchjob_crd(repo_root: Path) -> Path:
    """Kubeflow's PyTorchJob CRD when a copy sits beside the repository, else Forge's minimal one."""
    kubeflow = repo_root.parent / "shared" / "fixtures" / "kubeflow.org_pytorchjobs.yaml"
    if kubeflow.is_file():
        return kubeflow
    print(f"note: {kubeflow} not found; using Forge's minimal PyTorchJob CRD", file=sys.stderr)
    return minimal_pytorchjob_crd_path()


def kubectl(kubeconfig: Path, *args: str) -> None:
    binary = shutil.which("kubectl")
    if binary is None:
        raise SystemExit("kubectl not found: run `make tools`")
    subprocess.run([binary, f"--kubeconfig={kubeconfig}", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo-root", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    repo_root: Path = args.repo_root.resolve()

    print("== starting a local control plane (etcd, kube-apiserver, kube-controller-manager)")
    with ControlPlane() as plane:
        os.environ["KUBECONFIG"] = str(plane.kubeconfig)
        from kubernetes import config

        with config.new_client_from_config(config_file=str(plane.kubeconfig)) as api:
            names = install_crds(api, [*sorted((repo_root / "crds").glob("*.yaml")), pytorchjob_crd(repo_root)])
        print(f"== installed CRDs: {', '.join(names)}")
        print(f"== kubectl apply -f {DEMO_MANIFEST}")
        kubectl(plane.kubeconfig, "apply", "-f", str(repo_root / DEMO_MANIFEST))
        kubectl(plane.kubeconfig, "get", "forgejobs")
    print("== control plane stopped; nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
