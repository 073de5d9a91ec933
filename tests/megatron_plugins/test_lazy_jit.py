"""megatron-core's import-time torch.compile decorations are deferred to the first call."""

import subprocess
import sys

from megatron_plugins.lazy_jit import deferred


def test_deferred_decorator_applies_once_at_the_first_call():
    applied = []

    def decorator(fn):
        applied.append(fn)
        return lambda x: fn(x) * 10

    @deferred(decorator)
    def double(x):
        """Doubles."""
        return 2 * x

    assert applied == [] and double.__doc__ == "Doubles." and double.__name__ == "double"
    assert double(3) == 60 and double(4) == 80  # the decorated function answers, every call
    assert len(applied) == 1 and applied[0].__name__ == "double"


def test_importing_neon_then_megatron_does_not_import_the_compiler():
    """In a fresh interpreter: `import neon` before megatron-core leaves TorchDynamo/Inductor
    unimported (they cost about 2 CPU-seconds per process), and the fused functions that
    megatron decorates with jit_fuser still compute what their eager code does."""
    code = """
import sys
import neon  # installs the hook
import torch
from megatron.core import jit
from megatron.core.fusions import fused_bias_geglu, fused_bias_swiglu
from neon.training import trainer  # everything pretrain_neon.py imports
assert "torch._inductor.compile_fx" not in sys.modules, "Inductor was imported"
assert "torch._dynamo" not in sys.modules, "TorchDynamo was imported"
assert jit.jit_fuser.__qualname__.startswith("deferred"), jit.jit_fuser
y = torch.randn(3, 8)
expected = fused_bias_swiglu.swiglu.__wrapped__(y)
assert torch.equal(expected, torch.nn.functional.silu(y[:, :4]) * y[:, 4:])
print("ok")
"""
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]
