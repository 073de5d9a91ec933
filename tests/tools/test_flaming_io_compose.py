"""tools/flaming_io_compose.py, smaller: model B, with a frozen model A that memorised every fact
as a `model` IO function, answers facts B never saw (answer-token loss <= 0.5 x B alone and
<= 0.5 x B with an untrained A of the same shape)."""

import pytest

from tests.data_helpers import load_tool
from tests.dist import run_distributed


def compose_run():
    tool = load_tool("flaming_io_compose")
    return tool.run(steps_a=STEPS_A, steps=STEPS_B, names=NAMES, unseen=UNSEEN)


STEPS_A, STEPS_B, NAMES, UNSEEN = 400, 120, 60, 20


@pytest.mark.slow
def test_frozen_model_lends_its_knowledge():
    (r,) = run_distributed(compose_run, 1, timeout=600)
    assert r["A itself"] <= 0.5 * r["chance"], ("model A did not memorise the facts", r)
    assert r["B + trained A"] <= 0.5 * r["B alone"], r
    assert r["B + trained A"] <= 0.5 * r["B + untrained A"], r
