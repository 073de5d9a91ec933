"""The wandb that megatron-core imports is loaded only when it is used."""

import subprocess
import sys

LOADED = "'wandb.sdk' in sys.modules"


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_importing_neon_then_megatron_defers_wandb_until_it_is_used():
    """In a fresh interpreter: everything pretrain_neon.py imports leaves wandb unloaded (torch's
    inspect.getmodule scan included); megatron's `wandb` and `import wandb` then reach the real
    module at their first attribute."""
    out = run(f"""
import sys
import neon
from neon.training import trainer
from megatron.core import timers
print({LOADED}, timers.wandb is sys.modules["wandb"])
import wandb
print(wandb.Settings.__module__, timers.wandb.init is wandb.init, {LOADED}, type(sys.modules["wandb"]).__name__)
""")
    assert out.split() == ["False", "True", "wandb.sdk.wandb_settings", "True", "True", "module"], out


def test_without_the_stand_in_megatron_loads_wandb_at_import():
    """What the stand-in saves (so the test above can fail)."""
    assert run(f"import sys, megatron.core.timers; print({LOADED})").split() == ["True"]
