"""FlamingMoE IO functions through pretrain_neon.py (real torchrun, gloo, test corpus): the IO
list from a YAML file and from flags, distributed checkpoints of a per-layer bank [learned,
learned, store (learned query: learned keys re-indexed every 2 steps, a null entry), callable]
and a global bank [learned, store (context query, searched once per micro-batch)] (learned parts
sharded, the global bank's stored once, sources recorded and checked at load, a swap only when
asked for), an exact resume with the default Gumbel router (at EP=2 x PP=2 too: the RNG states
are saved per DP rank there), and every bad source ending with a clear error and no checkpoint."""

from pathlib import Path

import numpy as np
import pytest
from torch.distributed.checkpoint import FileSystemReader

from neon.io.encoder import describe
from neon.io.store import write_store
from tests.neon.training.corpus import make_corpus
from tests.neon.training.runs import check, latest, launch, metrics, tiny_args

pytestmark = pytest.mark.slow
VOCAB = 256  # the test corpus's tokenizer (a multiple of 128: not padded)
N = 6
LR = 0.05  # the learned keys move enough in a step that an index of older keys finds other entries
CALLABLE = "name=add,kind=callable,source=tests.neon.io_callables:sum_last_two,width=2"


def build_store(path: Path, seed: int, vocab: int = VOCAB) -> str:
    rng = np.random.default_rng(seed)
    records = [rng.integers(0, vocab, 24).tolist() for _ in range(8)]
    write_store(str(path), describe("random:5", 3, 8, vocab), records)
    return str(path)


def io_args(corpus, store: str, yaml_file: Path, callable_spec: str = CALLABLE, **overrides) -> list[str]:
    """The store function from the YAML file's model section, then the flag's list (flags win:
    both entries given as two arguments of --flaming-io-functions)."""
    yaml_file.write_text("model:\n  flaming_io_functions: name=facts,kind=store,source=/not/used\n")
    values = dict(num_layers=2, train_iters=N, eval_interval=N, flaming_moe="between", flaming_layer_functions=2,
                  flaming_global_functions=1, flaming_topk=1, flaming_io_context_window=4)  # Gumbel router
    values.update(overrides)
    return ["--config", str(yaml_file), *tiny_args(*corpus, **values), "--flaming-io-functions",
            f"name=facts,kind=store,source={store},query=learned,null=1,topk=2,reindex=2", callable_spec,
            f"name=shared,kind=store,source={store},query=context,topk=2,bank=global"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """N steps in one go, checkpoints at N/2 and N."""
    tmp = tmp_path_factory.mktemp("io_run")
    store = build_store(tmp / "store", seed=0)
    save = tmp / "ckpt"
    out = check(launch(io_args(corpus, store, tmp / "io.yaml", save=save, save_interval=N // 2, lr=LR),
                     timeout=300))
    return tmp, store, save, out


def test_io_run_saves_sources_and_resumes_exactly(corpus, trained, tmp_path):
    tmp, store, save, out = trained
    assert latest(save) == N and (save / f"iter_{N // 2:07d}" / "metadata.json").is_file()
    config = (save / "config.yaml").read_text()
    assert f"source={store}" in config and "name=add,kind=callable" in config  # the flag's list won
    # the checkpoint holds the learned functions on the expert axis, the IO functions' learned
    # parts under their own keys and each source's identity in the function's _extra_state
    keys = set(FileSystemReader(str(save / f"iter_{N:07d}")).read_metadata().state_dict_metadata)
    layer = "decoder.layers.flaming_moe.layer_bank.experts."
    assert f"{layer}experts.linear.weight" in keys, sorted(keys)[:40]
    for name, param in (("facts", "value_embedding.weight"), ("facts", "out_proj.weight"),
                        ("facts", "key_embedding.weight"), ("facts", "query_proj.weight"), ("facts", "null_key"),
                        ("facts", "indexed_key_embedding"),
                        ("add", "embedding.weight"), ("add", "out_proj.weight")):
        assert f"{layer}io_functions.{name}.{param}" in keys, sorted(k for k in keys if "io_" in k)
    for name in ("facts", "add"):  # one per layer (the layer axis)
        assert sum(k.startswith(f"{layer}io_functions.{name}._extra_state/") for k in keys) == 2
    # the global bank: its learned function on the expert axis and its IO function once (no layer axis)
    shared = "flaming_global_functions."
    assert f"{shared}experts.linear.weight" in keys, sorted(k for k in keys if k.startswith(shared))
    for param in ("value_embedding.weight", "out_proj.weight"):
        assert f"{shared}io_functions.shared.{param}" in keys, sorted(k for k in keys if k.startswith(shared))
    assert sum(k.startswith(f"{shared}io_functions.shared._extra_state") for k in keys) == 1, \
        sorted(k for k in keys if k.startswith(shared))
    assert not any(".global_bank.experts." in k for k in keys)  # the layers hold no copy

    assert "re-indexed the learned keys of IO function 'facts' after step 2" in out
    # resume from N/2 (the learned keys last indexed at step 2: the checkpoint's snapshot, not the
    # keys of step 3, is searched) into another directory: iterations N/2+1 .. N as in the
    # uninterrupted run
    resumed = tmp_path / "resumed"
    check(launch(io_args(corpus, store, tmp_path / "io.yaml", load=save, ckpt_step=N // 2, save=resumed, lr=LR),
                 timeout=300))
    ref, got = metrics(save), metrics(resumed)
    assert sorted(got) == list(range(N // 2 + 1, N + 1))
    for it in got:
        assert got[it]["loss"] == ref[it]["loss"], (it, got[it]["loss"], ref[it]["loss"])
        for key in ("flaming_io_facts_recall@2", "flaming_io_facts_contrastive_loss"):  # the learned query's log,
            assert got[it].get(key) == ref[it].get(key), (it, key)  # in steps where a token had a teacher entry
    assert any("flaming_io_facts_recall@2" in r for r in ref.values()), ref


def test_another_store_at_load_is_refused_unless_swapped(corpus, trained, tmp_path):
    tmp, store, save, _ = trained
    other = build_store(tmp_path / "other", seed=1)
    args = io_args(corpus, other, tmp_path / "io.yaml", load=save, save=tmp_path / "s", train_iters=N + 1)
    text = check(launch(args, nproc=0, timeout=300), code=4)  # plain python: torchrun reports 1
    assert "IO function 'facts'" in text and "differs from the checkpoint's store" in text, text[-3000:]
    assert "flaming_io_store_swap" in text and "Traceback" not in text
    assert latest(tmp_path / "s") is None
    # asked for: the other store is attached to the trained weights and training goes on
    check(launch([*args, "--flaming-io-store-swap"], timeout=300))
    assert sorted(metrics(tmp_path / "s")) == [N + 1] and latest(tmp_path / "s") == N + 1


@pytest.mark.parametrize("bad", ["truncated", "unimportable", "wrong_shape", "raises"])
def test_bad_source_fails_clearly_and_writes_no_checkpoint(corpus, tmp_path, bad):
    store = build_store(tmp_path / "store", seed=0)
    spec = CALLABLE
    if bad == "truncated":
        keys = Path(store) / "keys.f32"
        keys.write_bytes(keys.read_bytes()[:-8])
    elif bad == "unimportable":
        spec = CALLABLE.replace("tests.neon.io_callables:sum_last_two", "no_such_module:f")
    else:
        spec = CALLABLE.replace("sum_last_two", bad)
    save = tmp_path / "ckpt"
    text = check(launch(io_args(corpus, store, tmp_path / "io.yaml", callable_spec=spec, save=save,
                                save_interval=1), nproc=0, timeout=300), code=2)
    assert "Traceback" not in text, text[-3000:]
    expected = {"truncated": ["IO function 'facts'", "keys.f32", "truncated", "Fix: rebuild the store"],
                "unimportable": ["IO function 'add'", "cannot import module 'no_such_module'", "Fix:"],
                "wrong_shape": ["training step 1", "IO function 'add'", "returned shape", "Fix:"],
                "raises": ["training step 1", "IO function 'add'", "raised: KeyError", "service unavailable"]}
    for part in expected[bad]:
        assert part in text, (part, text[-3000:])
    assert latest(save) is None and not list(save.glob("iter_*")) and not list(save.glob(".tmp_iter_*"))


def test_io_run_at_ep2_pp2_trains_saves_and_resumes(corpus, tmp_path):
    """4 processes: EP=2 (the bank [2 learned, store, callable] split 2 + 2: the IO functions on EP
    rank 1; the global bank [learned, store] split 1 + 1, a replica on each stage) x PP=2 (one
    layer per stage); 2 steps with a distributed checkpoint of that layout at each, and step 2
    again from the first checkpoint, bit for bit."""
    store = build_store(tmp_path / "store", seed=0)
    save = tmp_path / "ckpt"
    layout = dict(expert_model_parallel_size=2, pipeline_model_parallel_size=2, train_iters=2, eval_interval=2)
    check(launch(io_args(corpus, store, tmp_path / "io.yaml", **layout, save=save, save_interval=1),
                 nproc=4, timeout=400))
    assert sorted(metrics(save)) == [1, 2] and latest(save) == 2
    assert all(r["loss"] > 0 for r in metrics(save).values())
    resumed = tmp_path / "resumed"
    check(launch(io_args(corpus, store, tmp_path / "io.yaml", **layout, load=save, ckpt_step=1, save=resumed),
                 nproc=4, timeout=400))
    assert sorted(metrics(resumed)) == [2] and metrics(resumed)[2]["loss"] == metrics(save)[2]["loss"]
