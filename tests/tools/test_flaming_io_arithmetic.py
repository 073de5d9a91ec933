"""tools/flaming_io_arithmetic.py, smaller: a model whose IO function is a Python callable
(the two-digit sum in its context) learns to use it: its loss on the result digits is far
below an identical model's without it, after the same steps."""

import math

import pytest

from tests.data_helpers import load_tool
from tests.dist import run_distributed


def arithmetic_run():
    return load_tool("flaming_io_arithmetic").run(steps=120)


@pytest.mark.slow
def test_model_learns_to_use_the_callable():
    (r,) = run_distributed(arithmetic_run, 1, timeout=600)
    assert r["with callable"] <= 0.5 * r["without"], r
    assert r["with callable"] <= 0.5 * math.log(10), r  # and well below chance
