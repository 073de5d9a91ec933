"""tools/wandb_agent.sh takes the W&B API key only from the environment or an owner-only file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "tools" / "wandb_agent.sh"
KEY = "0123456789abcdef0123456789abcdef01234567"


def _agent(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.run(["bash", str(AGENT), *args], env={**base, "WANDB_AGENT_DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=30)


def test_key_file_readable_by_group_or_others_is_refused(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    for mode in (0o644, 0o640, 0o604):
        key_file.chmod(mode)
        r = _agent("team/proj/sweep1", WANDB_API_KEY_FILE=str(key_file))
        assert r.returncode == 4, r
        assert "refusing" in r.stderr and "chmod 600" in r.stderr
        assert KEY not in r.stdout + r.stderr


def test_key_file_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        return  # only root can give a file away
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    os.chown(key_file, 65534, 65534)
    r = _agent("team/proj/sweep1", WANDB_API_KEY_FILE=str(key_file))
    assert r.returncode == 4 and "owned by uid 65534" in r.stderr, r


def test_owner_only_key_file_or_environment_is_used_and_never_printed(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    r = _agent("team/proj/sweep1", "--count", "2", WANDB_API_KEY_FILE=str(key_file))
    assert r.returncode == 0, r
    assert f"with a {len(KEY)}-character key: wandb agent team/proj/sweep1 --count 2" in r.stdout
    assert KEY not in r.stdout + r.stderr
    r = _agent("team/proj/sweep1", WANDB_API_KEY=KEY, WANDB_API_KEY_FILE=str(tmp_path / "missing"))
    assert r.returncode == 0 and "taken from WANDB_API_KEY" in r.stderr, r


def test_missing_key_and_key_arguments_are_errors(tmp_path):
    r = _agent("team/proj/sweep1", WANDB_API_KEY_FILE=str(tmp_path / "missing"))
    assert r.returncode == 3 and "no API key" in r.stderr, r
    r = _agent("team/proj/sweep1", f"--api-key={KEY}", WANDB_API_KEY=KEY)
    assert r.returncode == 2 and "never on the command line" in r.stderr, r
    assert KEY not in r.stdout + r.stderr
