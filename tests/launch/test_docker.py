"""The Dockerfile: hadolint-clean, runs as a non-root user, bakes in no secrets, and its install
step (tools/install_neon.sh) keeps the image's torch while installing Neon and megatron-core.

There is no Docker engine on the development and CI machines, so the install step is run here
against this environment's torch with pip's --dry-run: the same script, the same pip resolution.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the pinned dev tools with pip install -r requirements.txt")
    return path


def test_dockerfile_passes_hadolint():
    r = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_pins_ngc_base_runs_unprivileged_and_has_no_secrets():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and all(re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", f) for f in froms), froms
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert "tools/install_neon.sh" in text
    assert not re.search(r"(API_KEY|TOKEN|PASSWORD|SECRET)\s*=", text, flags=re.I)
    assert not re.search(r"torch==", text), "the image's torch must not be replaced"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored), ignored


def _pinned(name: str) -> str:
    """The version requirements.txt pins `name` to (the version the suite is tested with)."""
    pins = dict(line.split("==", 1) for line in (ROOT / "requirements.txt").read_text().split()
                if "==" in line and not line.startswith("#"))
    return pins[name].strip()


def test_install_step_keeps_torch_and_installs_neon_with_the_pinned_megatron_core(tmp_path):
    report = tmp_path / "report.json"
    r = subprocess.run(["bash", str(ROOT / "tools/install_neon.sh"), str(ROOT), "--dry-run", "--quiet",
                        "--report", str(report)],
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    import torch

    assert f"keeping torch=={torch.__version__}" in r.stderr
    items = {i["metadata"]["name"].lower(): i["metadata"] for i in json.loads(report.read_text())["install"]}
    would_install = {name: meta["version"] for name, meta in items.items()}
    assert "torch" not in would_install, would_install
    assert would_install.get("neon") == "0.1.0", would_install
    # The image gets the megatron-core that Neon's own metadata requires: the one the suite pins.
    pin = _pinned("megatron-core")
    requires = [r.replace(" ", "") for r in items["neon"].get("requires_dist", [])]
    assert f"megatron-core=={pin}" in requires, (pin, requires)
    if "megatron-core" in would_install:
        assert would_install["megatron-core"] == pin, would_install
    else:  # pip kept the installed one because it satisfies that requirement
        from importlib.metadata import version

        assert version("megatron-core") == pin
