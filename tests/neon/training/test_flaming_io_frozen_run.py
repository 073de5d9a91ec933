"""pretrain_neon.py with a FlamingMoE `model` IO function (a frozen transformers causal LM on
disk): the run trains (no checkpoint: not implemented for IO banks yet), and its log reports
the frozen model's share of the step and its memory."""

import pytest

from tests.neon.test_flaming_moe_io_frozen import write_frozen
from tests.neon.training.runs import check, launch, metrics, tiny_args


@pytest.mark.slow
def test_pretrain_with_a_frozen_model_function(corpus, tmp_path):
    frozen = write_frozen(str(tmp_path / "frozen"), vocab=512)  # >= Neon's padded vocabulary
    save = tmp_path / "run"
    # the list setting through the --config YAML file (on this branch a list flag is read as one string)
    entry = f"name=anchor,kind=model,source={frozen},layer=-1"
    (tmp_path / "io.yaml").write_text(f"model:\n  flaming_io_functions:\n    - {entry}\n")
    # no checkpoint: distributed checkpoints of banks with IO functions are not implemented yet
    out = check(launch([*tiny_args(*corpus, train_iters=4, eval_interval=4, run_dir=save),
                        "--flaming-moe", "between", "--flaming-layer-functions", "1", "--flaming-topk", "1",
                        "--config", str(tmp_path / "io.yaml")],
                       nproc=1, timeout=300, HF_HUB_OFFLINE="1"))
    train = metrics(save)
    assert sorted(train) == [1, 2, 3, 4]
    for record in train.values():
        assert 0 < record["frozen_model_time_share"] < 1
        assert record["frozen_model_memory_gb"] > 0
    assert "frozen_model_time_share" in out
