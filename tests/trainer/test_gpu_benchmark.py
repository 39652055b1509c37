"""benchmarks/trainer_gpu_h200.py runs first time: its wheels cover what the device image lacks, and its ``--shape
tiny`` run (the same code, on CPU) measures every phase and writes its results and the children's stderr."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.trainer.harness import REPO_ROOT, base_env

SCRIPT = REPO_ROOT / "benchmarks" / "trainer_gpu_h200.py"
# imported only for S3 sources and status reports, which the benchmark does not use
LAZY = {"boto3", "kubernetes"}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trainer_gpu_h200", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(dist: str) -> set[str]:
    """Names of a distribution's requirements without extras or markers that exclude Linux."""
    out = set()
    for req in md.requires(dist) or []:
        name, _, marker = req.partition(";")
        if "extra ==" in marker or "platform_system == 'Windows'" in marker:
            continue
        out.add(norm(re.split(r"[<>=!~\[ (]", name.strip(), maxsplit=1)[0]))
    return out


def test_wheels_and_image_cover_every_runtime_requirement() -> None:
    bench = load_script()
    carried = {norm(w.split("==")[0]) for w in bench.WHEELS} | {"deepspeed"}
    available = carried | {norm(n) for n in bench.IMAGE_HAS}
    missing: dict[str, set[str]] = {}
    for dist in sorted(carried | {"forge-trainer"}):
        needs = runtime_requirements(dist) - available - (LAZY if dist == "forge-trainer" else set())
        if needs:
            missing[dist] = needs
    assert not missing, f"not in WHEELS nor in the image: {missing}"
    # the pins carried are the ones this venv tests with
    for wheel in (*bench.WHEELS, bench.DEEPSPEED):
        name, version = wheel.split("==")
        assert md.version(name) == version, wheel


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tiny_shape_runs_every_phase_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "8", "--windows", "3", "--log-every", "2"]
    argv += ["--variants", "forge-zero2", "--work", str(tmp_path / "work"), "--out", str(out), "--budget-s", "300"]
    done = subprocess.run(argv, env=base_env(), capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "cpu"
    for phase in ("bare", "forge-zero2"):
        assert "error" not in results[phase], results[phase]
        assert results[phase]["tokensPerSecond"] > 0
    assert len(results["forge-zero2"]["windows"]) == 2  # 3 windows, the first skipped
    assert (out / "bare.err").is_file() and (out / "forge-zero2.err").is_file()
