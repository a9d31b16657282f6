"""reg/constraints.py: the constraints file that keeps a cluster's own torch when requirements.txt is installed.

The pip test is offline: fake wheels (metadata only) of torch and torchvision in a folder, a fresh venv with
the "cluster's" torch 2.4.0+cu121 and no torchvision, and pip's own resolver (--dry-run --report). CI repeats
it on the real index with real torch 2.4.0 (.ci/old_torch.sh)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from reg import constraints
from reg.utils import UserError

ROOT = Path(__file__).resolve().parents[1]


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A wheel that holds only its metadata: enough for pip to resolve and install it."""
    info = f"{name}-{version}.dist-info"
    files = {f"{info}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def pip_env() -> dict:
    """No pip configuration of this machine (its find-links, indexes and global constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture
def cluster(tmp_path):
    """A venv whose torch is 2.4.0+cu121 (a CUDA build from PyTorch's index) and a folder of wheels holding a
    newer torch and the torchvision releases that pin each torch, as the real ones do."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for torch, vision in (("2.4.0", "0.19.0"), ("2.5.0", "0.20.0")):
        fake_wheel(wheels, "torch", torch)
        fake_wheel(wheels, "torchvision", vision, (f"torch=={torch}",))
    fake_wheel(wheels, "torch", "2.4.0+cu121")
    fake_wheel(wheels, "torch", "2.3.1")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python]
    offline = ["--no-index", "--find-links", str(wheels), "-q"]

    def install(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*pip, "install", *offline, *args], env=pip_env(), capture_output=True, text=True,
                              timeout=120)

    def make_constraints(out: Path) -> subprocess.CompletedProcess:
        """reg.constraints run by the venv's own Python (standard library only), as a user runs it."""
        return subprocess.run([python, "-m", "reg.constraints", "-o", str(out), "--requirements",
                               str(tmp_path / "requirements.txt")], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)

    (tmp_path / "requirements.txt").write_text("torch>=2.4.0\ntorchvision>=0.19.0\n")
    return install, make_constraints


def would_install(install, tmp_path: Path, *args: str) -> dict[str, str]:
    """{name: version} pip would install for requirements.txt, from its --dry-run --report."""
    report = tmp_path / "report.json"
    done = install("--dry-run", "--report", str(report), "-r", str(tmp_path / "requirements.txt"), *args)
    assert done.returncode == 0, done.stderr
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


def test_constraints_keep_the_installed_torch(cluster, tmp_path):
    install, make_constraints = cluster
    out = tmp_path / "constraints.txt"
    missing = make_constraints(out)  # no torch yet: one line that says so, and no file
    assert missing.returncode == 2 and "torch is not installed" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not out.exists()

    assert install("torch==2.4.0+cu121").returncode == 0  # the cluster's torch, without torchvision
    # the problem: pip takes the newest torchvision, which pins the newest torch, and replaces the cluster's
    assert would_install(install, tmp_path) == {"torch": "2.5.0", "torchvision": "0.20.0"}

    done = make_constraints(out)
    assert done.returncode == 0, done.stderr
    # the metadata's version with its local label: pip matches it exactly against the installed torch
    assert [ln for ln in out.read_text().splitlines() if not ln.startswith("#")] == ["torch==2.4.0+cu121"]
    assert "torchvision is not installed" in done.stderr
    assert would_install(install, tmp_path, "-c", str(out)) == {"torchvision": "0.19.0"}  # torch kept
    # even when asked to upgrade everything
    assert would_install(install, tmp_path, "-c", str(out), "--upgrade") == {"torchvision": "0.19.0"}

    # a torch older than requirements.txt's bound: refused, and the file is left as it was
    assert install("--force-reinstall", "torch==2.3.1").returncode == 0
    before = out.read_text()
    old = make_constraints(out)
    assert old.returncode == 2 and "torch 2.3.1 is installed, older than requirements.txt's lower bound" in old.stderr
    assert out.read_text() == before


@pytest.mark.parametrize("version,bound,expected", [
    ("2.4.0", "2.4.0", "ok"), ("2.4", "2.4.0", "ok"), ("2.10.1+cu128", "2.4.0", "ok"), ("2.4.0.post1", "2.4.0", "ok"),
    ("2.3.9", "2.4.0", "older"), ("1.13.1", "2.4.0", "older"),
    ("2.4.0a0+3bcc3cddb5.nv24.07", "2.4.0", "pre"), ("2.4.0rc1", "2.4.0", "pre"), ("2.4.0.dev20240601", "2.4", "pre"),
])
def test_installed_versions_are_checked_against_the_lower_bounds(monkeypatch, tmp_path, version, bound, expected):
    """Version order as pip's (PEP 440): 2.10 > 2.4, and a pre-release (NGC's 2.4.0a0) comes before 2.4.0."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"# ranges\ntorch>={bound}\nnumpy>=1.26.4\n")
    monkeypatch.setattr(constraints.metadata, "version", {"torch": version, "numpy": "1.26.4"}.__getitem__)
    if expected == "older":
        with pytest.raises(UserError, match=f"torch {version} is installed, older than .* torch>={bound}"):
            constraints.constraints(["torch"], requirements)
        return
    text, warnings = constraints.constraints(["torch", "numpy"], requirements)
    assert text.splitlines()[1:] == [f"torch=={version}", "numpy==1.26.4"]
    assert [w for w in warnings if "pre-release" in w] == ([] if expected == "ok" else [warnings[0]])
    if expected == "pre":
        assert "grep -vE '^(torch|torchvision)>=' requirements.txt" in warnings[0]


def test_the_bounds_are_requirements_txts():
    """The checked bounds are the file's own, every package included (a typo'd line would drop one)."""
    bounds = constraints.lower_bounds(constraints.REQUIREMENTS)
    lines = [ln for ln in constraints.REQUIREMENTS.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(bounds) == len(lines) and bounds["torch"] == "2.4.0" and bounds["huggingface-hub"]
