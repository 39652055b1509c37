"""Helpers for the chart tests: the real helm binary, rendering, and applying manifests to the local API server."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, dynamic
from kubernetes.client.rest import ApiException

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "forge"
MONITORING_API_VERSIONS = (
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)

T = TypeVar("T")


def tool(name: str) -> str:
    """Path of helm or kubectl: $FORGE_CACHE_DIR/bin first (scripts/install-tools.sh), then PATH."""
    cache = Path(os.environ.get("FORGE_CACHE_DIR", Path.home() / ".cache" / "forge")) / "bin" / name
    if cache.is_file() and os.access(cache, os.X_OK):
        return str(cache)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} not found in {cache.parent} or on PATH: run `make tools`")
    return found


def helm(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run helm; with check, fail the test showing helm's output."""
    proc = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def value_args(values: Mapping[str, Any] | None, tmp: Path) -> list[str]:
    """``--values FILE`` for a values mapping (written as YAML into ``tmp``)."""
    if not values:
        return []
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"values-{len(list(tmp.glob('values-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(dict(values)))
    return ["--values", str(path)]


def template(
    tmp: Path,
    values: Mapping[str, Any] | None = None,
    release: str = "forge",
    namespace: str = "forge-system",
    api_versions: Iterable[str] = (),
    extra: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """``helm template`` the chart; the rendered objects (empty documents dropped)."""
    args = ["template", release, str(CHART), "--namespace", namespace, *value_args(values, tmp)]
    for api_version in api_versions:
        args += ["--api-versions", api_version]
    out = helm(*args, *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds.

    An AssertionError from ``probe`` is a verdict (e.g. the process died) and fails at once; other errors are
    retried and reported on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as err:  # retried; reported on timeout
            last_error = err
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def apply_objects(api: client.ApiClient, objects: Iterable[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """Create every object through the dynamic client (server-side validation of each); return what the API
    server stored. Namespaced objects without a namespace go into ``namespace``."""
    dyn = dynamic.DynamicClient(api)
    stored = []
    for obj in objects:
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        ns = obj["metadata"].get("namespace", namespace) if resource.namespaced else None
        try:
            created = resource.create(body=obj, namespace=ns)
        except ApiException as err:
            raise AssertionError(
                f"the API server rejected {obj['kind']} {obj['metadata']['name']}: {err.status} {err.body}"
            ) from None
        stored.append(created.to_dict())
    return stored


def delete_cluster_objects(api: client.ApiClient, objects: Iterable[dict[str, Any]]) -> None:
    """Delete the cluster-scoped objects among ``objects`` (namespaced ones go with their namespace)."""
    dyn = dynamic.DynamicClient(api)
    for obj in objects:
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        if resource.namespaced:
            continue
        try:
            resource.delete(name=obj["metadata"]["name"])
        except ApiException as err:
            if err.status != 404:
                raise
