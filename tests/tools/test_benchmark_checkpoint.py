"""tools/benchmark_checkpoint.py through its CLI, tiny: both modes run pretrain_neon.py, save, and
print the loop's seconds per save and their ratio."""

import re

import pytest

from tests.data_helpers import load_tool
from tests.neon.training.corpus import make_corpus


@pytest.mark.slow
def test_benchmark_prints_the_loops_time_per_save_both_ways(capsys, tmp_path):
    tokenizer, data = make_corpus(tmp_path / "corpus")
    assert load_tool("benchmark_checkpoint").main(["--layers", "1", "--hidden", "64", "--saves", "2",
                                                  "--data-path", data, "--tokenizer-model", tokenizer,
                                                  "--seq-length", "32", "--max-position-embeddings", "64",
                                                  "--global-batch-size", "4", "--micro-batch-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(sync|async)\s+([\d.]+)\s", out, re.M))
    assert set(rows) == {"sync", "async"} and all(float(v) >= 0 for v in rows.values()), out
    assert re.search(r"sync / async: [\d.]+x", out) and "MiB" in out, out
