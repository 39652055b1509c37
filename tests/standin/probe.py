"""A tiny "trainer" the stand-in tests run as a replica's container command.

It records what a replica sees (environment, working directory, mounted files, API permissions) in
``<out>/record-<RANK>.json``, appends one line per start to ``<out>/starts-<RANK>.txt``, then behaves as told.
Only the standard library (and the kubernetes client for ``--kube``) is used.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _api_checks(namespace: str) -> dict[str, Any]:
    """What the process's KUBECONFIG allows: list ConfigMaps (allowed by the test Role), list Secrets (not)."""
    import warnings

    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    warnings.filterwarnings("ignore")
    api = config.new_client_from_config()
    core = client.CoreV1Api(api)
    results: dict[str, Any] = {}
    for what, call in (
        ("configmaps", core.list_namespaced_config_map),
        ("secrets", core.list_namespaced_secret),
    ):
        try:
            call(namespace)
            results[what] = 200
        except ApiException as error:
            results[what] = error.status
    token = api.configuration.api_key["BearerToken"].split(" ", 1)[1]
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    results["subject"] = claims.get("sub")
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--read", action="append", default=[], help="a file whose text to record")
    parser.add_argument("--touch", action="append", default=[], help="a file to create (writable volumes)")
    parser.add_argument("--kube", default=None, help="namespace to check API permissions in")
    parser.add_argument("--fail-first", type=Path, default=None, help="exit 1 unless this marker exists (creates it)")
    parser.add_argument("--wait-for", type=Path, default=None, help="block until this file exists")
    parser.add_argument("--spawn-child", action="store_true", help="start a child process in the same group")
    parser.add_argument("--sleep", action="store_true", help="then sleep until killed")
    parser.add_argument("--exit", type=int, default=0)
    args = parser.parse_args()

    rank = os.environ.get("RANK", "x")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / f"starts-{rank}.txt").open("a") as starts:
        starts.write(f"{os.getpid()}\n")
    record: dict[str, Any] = {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv[1:], "env": dict(os.environ)}
    record["files"] = {path: Path(path).read_text() for path in args.read}
    record["modes"] = {path: oct(Path(path).stat().st_mode & 0o777) for path in args.read}
    for path in args.touch:
        Path(path).write_text("written by the replica")
    record["touched"] = args.touch
    if args.kube:
        record["api"] = _api_checks(args.kube)
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        record["child_pid"] = child.pid
    temporary = args.out / f"record-{rank}.json.tmp"
    temporary.write_text(json.dumps(record))
    temporary.replace(args.out / f"record-{rank}.json")
    print(f"probe rank {rank} recorded", flush=True)

    if args.fail_first is not None and not args.fail_first.exists():
        args.fail_first.write_text("failed once")
        print("probe failing on purpose (first start)", flush=True)
        return 1
    if args.wait_for is not None:
        while not args.wait_for.exists():
            time.sleep(0.05)
    if args.sleep:
        while True:
            time.sleep(1)
    return int(args.exit)


if __name__ == "__main__":
    sys.exit(main())
