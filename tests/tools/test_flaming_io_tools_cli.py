"""The three FlamingMoE IO task tools through their command lines, tiny: each starts its own
one-process group, trains, prints its losses and its verdict, and exits 0 (pass) or 1 (fail),
never with a traceback. The tasks themselves are checked in-process by test_flaming_io_knowledge,
test_flaming_io_arithmetic and test_flaming_io_compose."""

import subprocess
import sys

import pytest

from tests.neon.training.runs import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tool,args", [
    ("flaming_io_knowledge", ["--steps", "3", "--names", "20", "--unseen", "5", "--index", "hnsw"]),
    ("flaming_io_arithmetic", ["--steps", "3"]),
    ("flaming_io_compose", ["--steps-a", "3", "--steps", "3", "--names", "20", "--unseen", "5"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_io_tool_runs_from_its_command_line(tool, args):
    res = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                                      "PYTHONWARNINGS": "ignore"})
    assert res.returncode in (0, 1), res.stderr[-3000:]
    assert ("PASS" if res.returncode == 0 else "FAIL") in res.stdout and "nats" in res.stdout, res.stdout
    assert "Traceback" not in res.stderr
