"""tools/flaming_io_knowledge.py, smaller: a model with the `store` IO function answers codes of
names never seen in training from the store (loss <= 0.5 x an identical model without it, and
far below chance); with the unseen facts removed from the store it cannot. The same with the
store searched through a faiss IVF index instead of the exact search, and with the learned query
(full size: 200 training names)."""

import pytest

from tests.data_helpers import load_tool
from tests.dist import run_distributed


def knowledge_run(index: str):
    tool = load_tool("flaming_io_knowledge")
    return tool.run(steps=80, names=60, unseen=20, index=index)


@pytest.mark.slow
@pytest.mark.parametrize("index", ["exact", "ivf_flat"])
def test_store_carries_knowledge_outside_the_weights(index):
    (r,) = run_distributed(knowledge_run, 1, kwargs={"index": index}, timeout=600)
    assert r["with store"] <= 0.5 * r["no store"], r
    assert r["with store"] <= 0.5 * r["chance"], r
    assert r["unseen removed"] >= 0.8 * r["chance"], r  # the knowledge was in the store, not the weights


def learned_run():
    tool = load_tool("flaming_io_knowledge")
    return tool.run(steps=300, names=200, unseen=50, query="learned")


@pytest.mark.slow
def test_learned_query_finds_facts_of_unseen_names():
    """query=learned (learned keys, contrastive loss with the context query as teacher): the
    retrieval's recall@2 rises from the random start to all-found, and the model answers the
    codes of unseen names from the store."""
    (r,) = run_distributed(learned_run, 1, timeout=600)
    recall = r.pop("recall")
    assert sum(recall[:25]) / 25 < 0.6 and sum(recall[-25:]) / 25 >= 0.9, recall
    assert r["with store"] <= 0.5 * r["no store"], r
    assert r["unseen removed"] >= 0.8 * r["chance"], r
