#!/usr/bin/env python
r"""Knowledge outside the weights: a synthetic task for FlamingMoE's `store` IO function (CPU).

    python tools/flaming_io_knowledge.py [--steps 300] [--names 200] [--query context] [--index hnsw]

Facts "the code of <name> is <code>" (name: 2 random name tokens, code: 2 random code tokens).
Training sequences hold FACTS_PER_SEQ facts of training names; evaluation asks the codes of
names never seen in training, whose facts exist only in the store (built from every fact with
the frozen n-gram encoder, n = 4: the window ending at 'is' or at the first code token). Since
no evaluation fact is in the context, attention cannot copy the answer.

Reports the answer-token loss (nats, mean over the 2 code tokens of each evaluation fact):
  with store      the trained model, store with every fact
  unseen removed  the same model, store without the evaluation facts (swapped in)
  no store        an identical model trained the same steps without the IO function
  chance          log(code alphabet)
Pass: with store <= 0.5 x no store. With --query learned it also prints the retrieval's recall@2
(the fact's entry among the 2 retrieved) over the training steps.
"""

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

THE, CODE, OF, IS, EOS = range(5)
NAME_TOKENS, CODE_TOKENS = 24, 10
NAME0, CODE0 = 5, 5 + NAME_TOKENS
VOCAB = 48  # 5 specials + 24 name + 10 code tokens, padded
FACTS_PER_SEQ, FACT_LEN = 3, 9  # the code of n1 n2 is c1 c2 <eos>
ANSWER_OFFSETS = (6, 7)  # positions of c1, c2 inside a fact


def make_facts(names: int, gen) -> list[list[int]]:
    """Distinct 2-token names, each with a random 2-token code: [[the, code, of, n1, n2, is, c1, c2, eos]]."""
    pairs = torch.randperm(NAME_TOKENS * NAME_TOKENS, generator=gen)[:names]
    facts = []
    for p in pairs.tolist():
        code = torch.randint(0, CODE_TOKENS, (2,), generator=gen) + CODE0
        facts.append([THE, CODE, OF, NAME0 + p // NAME_TOKENS, NAME0 + p % NAME_TOKENS, IS, *code.tolist(), EOS])
    return facts


def batch(facts, size: int, gen) -> torch.Tensor:
    idx = torch.randint(0, len(facts), (size, FACTS_PER_SEQ), generator=gen)
    return torch.tensor([[t for i in row for t in facts[i]] for row in idx.tolist()])  # [b, 27]


def config(store: str, query: str, with_store: bool):
    from neon.config import NeonConfig

    io = dict(flaming_moe="between", flaming_layer_functions=0, flaming_topk=1, flaming_router="topk",
              flaming_io_context_window=4,
              flaming_io_functions=[f"name=facts,kind=store,source={store},query={query},topk=2,temperature=0.1"])
    return NeonConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=VOCAB,
                      max_position_embeddings=32, pipeline_dtype=torch.float32,
                      **(io if with_store else {}))


def answer_loss(model, seqs: torch.Tensor) -> float:
    """Mean cross-entropy of the code tokens, predicted from the token before each."""
    pos = torch.arange(seqs.shape[1]).expand_as(seqs)
    with torch.no_grad():
        logits = model(seqs[:, :-1], pos[:, :-1], None).float()  # [b, s-1, V]
    targets = [f * FACT_LEN + o for f in range(FACTS_PER_SEQ) for o in ANSWER_OFFSETS]
    lp = torch.log_softmax(logits[:, [t - 1 for t in targets]], dim=-1)  # predicted at t - 1
    return -lp.gather(-1, seqs[:, targets].unsqueeze(-1)).mean().item()


def train(cfg, facts, steps: int, seed: int, batch_size: int = 16, lr: float = 3e-3,
          step_times: list | None = None, recall: list | None = None):
    """The model of `cfg` trained with Adam on batches of `facts`; each step's seconds are
    appended to `step_times` when given, and a learned query's recall@k of the step (the
    teacher entry among the retrieved, over the layers) to `recall`."""
    from neon.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        t0 = time.perf_counter()
        seqs = batch(facts, batch_size, gen)
        pos = torch.arange(seqs.shape[1] - 1).expand(seqs.shape[0], -1)
        loss = model(seqs[:, :-1], pos, None, labels=seqs[:, 1:]).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)
        if recall is not None:
            hits = [v for m in model.modules() if getattr(m, "is_io", False)
                    for k, v in m.report().items() if "_recall@" in k]
            recall.append(sum(h for h, _ in hits) / max(1.0, sum(n for _, n in hits)))
    return model.eval()


def run(steps: int = 300, names: int = 200, unseen: int = 50, query: str = "context", seed: int = 0,
        workdir: str | None = None, index: str = "exact") -> dict:
    """Train with and without the store (searched with `index`: exact, or a faiss index of
    neon/io/index.py); the four answer-token losses on unseen names (and, for query='learned',
    "recall": the retrieval's recall@2 at each training step)."""
    from neon.io.encoder import describe
    from neon.io.index import index_params
    from neon.io.store import swap_store, token_entries, write_store

    gen = torch.Generator().manual_seed(seed)
    facts = make_facts(names + unseen, gen)
    train_facts, eval_facts = facts[:names], facts[names:]
    workdir = workdir or tempfile.mkdtemp(prefix="flaming_io_")
    full, seen_only = os.path.join(workdir, "all_facts"), os.path.join(workdir, "train_facts")
    enc = describe("random:7", 4, 64, VOCAB)
    for path, docs in ((full, facts), (seen_only, train_facts)):
        entries = sum(len(token_entries(d, 4, 1)[0]) for d in docs)
        write_store(path, enc, docs, value_width=1, index=index_params(index, entries, 64))
    eval_seqs = batch(eval_facts, 64, torch.Generator().manual_seed(seed + 1))

    recall: list = []
    model = train(config(full, query, True), train_facts, steps, seed, recall=recall)
    with_store = answer_loss(model, eval_seqs)
    swap_store(model, "facts", seen_only)
    removed = answer_loss(model, eval_seqs)
    plain = train(config(full, query, False), train_facts, steps, seed)
    out = {"with store": with_store, "unseen removed": removed, "no store": answer_loss(plain, eval_seqs),
           "chance": math.log(CODE_TOKENS)}
    return {**out, "recall": recall} if query == "learned" else out


def init_single_process() -> None:
    """A world-1 process group (its store on a port the kernel picks) and megatron's parallel state."""
    from megatron_plugins import distributed

    distributed.initialize(tensor_parallel=1, pipeline_parallel=1, expert_parallel=1, virtual_pipeline=None, seed=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--names", type=int, default=200, help="training names (facts)")
    p.add_argument("--unseen", type=int, default=50, help="evaluation names, never in training")
    p.add_argument("--query", choices=["context", "hidden", "learned"], default="context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", choices=["exact", "ivf_flat", "ivf_pq", "hnsw"], default="exact",
                   help="the stores' search index (neon/io/index.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    init_single_process()
    r = run(args.steps, args.names, args.unseen, args.query, args.seed, index=args.index)
    recall = r.pop("recall", None)
    for k, v in r.items():
        print(f"{k:>15}: {v:.3f} nats")
    if recall:  # the learned query's retrieval over training, in blocks of 25 steps
        blocks = [recall[i:i + 25] for i in range(0, len(recall), 25)]
        print("recall@2 by step: " + ", ".join(f"{25 * i + len(b)}: {sum(b) / len(b):.2f}"
                                                for i, b in enumerate(blocks)))
    ok = r["with store"] <= 0.5 * r["no store"]
    print(f"with store / no store = {r['with store'] / r['no store']:.2f}: {'PASS' if ok else 'FAIL'} (<= 0.5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
