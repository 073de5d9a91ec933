"""pretrain_neon.py with a FlamingMoE `model` IO function (a frozen transformers causal LM on
disk), through torchrun with the default DataLoader workers: the run trains and saves, its log
reports the frozen model's share of the step and its memory, the checkpoint records the frozen
model's identity (not its weights), a resume gives the uninterrupted run's losses bit for bit,
and resuming after the frozen model's directory changed (other weights) ends with exit 4 and one
paragraph naming the function, both identities and the fix. Three launches in all."""

import pytest
from torch.distributed.checkpoint import FileSystemReader

from neon.io.frozen_model import model_identity
from tests.neon.test_flaming_moe_io_frozen import write_frozen
from tests.neon.training.runs import check, latest, launch, metrics, tiny_args

N = 4  # steps; checkpoints at N/2 and N


def frozen_args(corpus, yaml_file, **overrides) -> list[str]:
    # num_workers=None: the flag is left out, so the default DataLoader workers load the data
    values = dict(num_layers=2, train_iters=N, eval_interval=N, num_workers=None, flaming_moe="between",
                  flaming_layer_functions=1, flaming_topk=1, flaming_router="topk")
    values.update(overrides)
    return [*tiny_args(*corpus, **values), "--config", str(yaml_file)]  # the IO list from the YAML file


@pytest.mark.slow
def test_pretrain_with_a_frozen_model_function_saves_resumes_and_checks_the_model(corpus, tmp_path):
    frozen = write_frozen(str(tmp_path / "frozen"), vocab=512)  # >= Neon's padded vocabulary
    trained_with = model_identity(frozen)
    yaml_file = tmp_path / "io.yaml"
    yaml_file.write_text(f"model:\n  flaming_io_functions:\n    - name=anchor,kind=model,source={frozen},layer=-1\n")
    save = tmp_path / "run"
    out = check(launch(frozen_args(corpus, yaml_file, save=save, save_interval=N // 2), timeout=300,
                       HF_HUB_OFFLINE="1"))
    train = metrics(save)
    assert sorted(train) == list(range(1, N + 1)) and latest(save) == N
    for record in train.values():
        assert 0 < record["frozen_model_time_share"] < 1
        assert record["frozen_model_memory_gb"] > 0
    assert "frozen_model_time_share" in out
    # the checkpoint: the projection W_out per layer and the identity, no frozen weight
    keys = set(FileSystemReader(str(save / f"iter_{N:07d}")).read_metadata().state_dict_metadata)
    layer = "decoder.layers.flaming_moe.layer_bank.experts.io_functions.anchor."
    assert f"{layer}out_proj.weight" in keys, sorted(k for k in keys if "io_" in k)
    assert sum(k.startswith(f"{layer}_extra_state/") for k in keys) == 2  # one per layer
    assert not [k for k in keys if "embed_tokens" in k or "q_proj" in k], "frozen weights were saved"

    # resume from N/2 into another directory: iterations N/2+1 .. N as in the uninterrupted run
    resumed = tmp_path / "resumed"
    check(launch(frozen_args(corpus, yaml_file, load=save, ckpt_step=N // 2, save=resumed), timeout=300,
                 HF_HUB_OFFLINE="1"))
    got = metrics(resumed)
    assert sorted(got) == list(range(N // 2 + 1, N + 1))
    for it in got:
        assert got[it]["loss"] == train[it]["loss"], (it, got[it]["loss"], train[it]["loss"])

    # the same directory with other weights: refused at load, before a step
    write_frozen(frozen, seed=1, vocab=512)
    now = model_identity(frozen)
    assert now["sha256"] != trained_with["sha256"]
    refused = tmp_path / "refused"
    text = check(launch(frozen_args(corpus, yaml_file, load=save, save=refused, train_iters=N + 1), nproc=0,
                        timeout=300, HF_HUB_OFFLINE="1"), code=4)  # plain python: torchrun reports 1
    assert "Traceback" not in text, text[-3000:]
    message = next(line for line in text.splitlines() if line.startswith("pretrain_neon.py: error:"))
    for part in ("IO function 'anchor'", "trained with the frozen model", trained_with["sha256"][:12],
                 now["sha256"][:12], frozen, "Fix:", "--flaming-io-store-swap"):
        assert part in message, (part, message)
    assert latest(refused) is None and not metrics(refused)
