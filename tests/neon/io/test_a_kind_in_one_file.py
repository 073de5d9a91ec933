"""A new IO kind in one file of its own (tests/neon/io/sqlite_kind.py: a read-only SQLite table
looked up by the token's last two ids), registered at run time and known to no other file of the
project: it trains through pretrain_neon.py, checkpoints, resumes bit for bit, and exports to
Hugging Face, where the exported model, loaded in a process that cannot import neon at all, gives
megatron's logits. The export carries the kind's file next to modeling_neon.py, with the same
code as training (its neon imports made relative).

This module is also the launcher (`python -m tests.neon.io.test_a_kind_in_one_file pretrain|convert_to_hf
<flags>`): it registers the kind, then runs the tool's main(), as a user's launcher would.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.neon.io.sqlite_kind import SQLiteKind
from tests.neon.training.corpus import make_corpus
from tests.neon.training.runs import REPO, check, launch, metrics, tiny_args

LAUNCHER = "tests.neon.io.test_a_kind_in_one_file"
TOKENS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(3))
# megatron's and the exported model's logits: the same function with other sum orders; each of the
# R = 4 layers x (13 reductions of attention, MLP and the block + 2 of the IO function) + 1 head
# reductions of n <= 128 terms moves by at most n * 2^-24 of the logits' scale (Higham's gamma_n)
EXPORT_ROUNDING = (4 * 15 + 1) * 128 * 2.0 ** -24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("sqlite_kind")
    tokenizer, data = make_corpus(work / "corpus")
    db = work / "bigrams.db"
    build_bigram_table(db, data, vocab=256)

    def args(table=db, **kw):
        flags = tiny_args(tokenizer, data, train_iters=4, eval_interval=4, flaming_moe="between",
                          flaming_layer_functions=1, flaming_router="topk", **kw)
        return [*flags, "--flaming-io-functions", f"name=next,kind=sqlite,source={table}"]

    save = work / "ckpt"
    full = check(launch(["pretrain", *args(save=save, save_interval=2)], nproc=0, script=LAUNCHER, timeout=300))
    return dict(work=work, db=db, args=args, save=save, log=full)


def build_bigram_table(path: Path, data: str, vocab: int) -> None:
    """(id_{t-1} * vocab + id_t) -> id_{t+1}, the first continuation in the corpus."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = IndexedDataset(data)
    ids = np.concatenate([docs[i] for i in range(len(docs))]).astype(np.int64)
    rows = {}
    for a, b, c in zip(ids[:-2], ids[1:-1], ids[2:]):
        rows.setdefault(int(a) * vocab + int(b), int(c))
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE bigrams (key INTEGER PRIMARY KEY, value INTEGER)")
    db.executemany("INSERT INTO bigrams VALUES (?, ?)", rows.items())
    db.commit()
    db.close()


def test_trains_and_resumes_bit_for_bit(run):
    losses = metrics(run["save"])
    assert sorted(losses) == [1, 2, 3, 4] and losses[4]["loss"] < losses[1]["loss"], losses
    resumed = run["work"] / "resumed"
    check(launch(["pretrain", *run["args"](load=run["save"], ckpt_step=2, save=resumed)], nproc=0, script=LAUNCHER,
                 timeout=300))
    again = metrics(resumed)
    assert sorted(again) == [3, 4] and [again[i]["loss"] for i in (3, 4)] == [losses[i]["loss"] for i in (3, 4)]
    # the table's identity is in the checkpoint: another table is refused at load, naming it
    other = run["work"] / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE bigrams (key INTEGER PRIMARY KEY, value INTEGER)")
    db.commit()
    db.close()
    refused = launch(["pretrain", *run["args"](table=other, load=run["save"], save=run["work"] / "x")], nproc=0,
                     script=LAUNCHER, timeout=300)
    assert refused.returncode == 4 and "IO function 'next'" in refused.stderr, refused.stderr[-3000:]
    assert "table file differs" in refused.stderr and "Traceback" not in refused.stderr


def _megatron_logits(save: str):
    from neon.io.base import register
    from tests.tools.conversion_helpers import megatron_logits

    register(SQLiteKind())
    return megatron_logits([save], TOKENS)[0]


BLOCKED = ("import sys, json, torch\n"
           "sys.modules['neon'] = None  # no part of Neon may be imported\n"
           "from transformers import AutoModelForCausalLM\n"
           "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()\n"
           "tokens = torch.tensor(json.loads(sys.argv[2]))\n"
           "with torch.no_grad():\n"
           "    torch.save(m(tokens).logits, sys.argv[3])\n")


def test_exports_with_its_own_code_and_loads_without_neon(run):
    from tests.dist import run_distributed

    hf = run["work"] / "hf"
    check(launch(["convert_to_hf", "--load", str(run["save"]), "--save", str(hf), "--quiet"], nproc=0, script=LAUNCHER,
                 timeout=300))
    shipped = (hf / "sqlite_kind.py").read_text()
    source = (REPO / "tests" / "neon" / "io" / "sqlite_kind.py").read_text()
    assert shipped == source.replace("from neon.errors import", "from .errors import").replace(
        "from neon.io.base import", "from .base import")  # the same code, its neon imports relative
    assert "from .sqlite_kind import SQLiteKind" in (hf / "kinds.py").read_text()
    assert json.loads((hf / "config.json").read_text())["flaming_io_sources"]["next"]["sha256"]
    out = subprocess.run([sys.executable, "-c", BLOCKED, str(hf), json.dumps(TOKENS.tolist()), str(hf / "logits.pt")],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-4000:]
    got = torch.load(hf / "logits.pt")
    (want,) = run_distributed(_megatron_logits, 1, kwargs={"save": str(run["save"])}, timeout=300)
    assert want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= EXPORT_ROUNDING * max(1.0, want.abs().max().item())


if __name__ == "__main__":  # the launcher: the kind registered, then the tool
    from neon.io.base import register

    register(SQLiteKind())
    tool, argv = sys.argv[1], sys.argv[2:]
    if tool == "pretrain":
        import pretrain_neon

        sys.exit(pretrain_neon.main(argv))
    sys.path.insert(0, str(REPO / "tools"))
    import convert_to_hf

    sys.exit(convert_to_hf.main(argv))
