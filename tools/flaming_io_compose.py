#!/usr/bin/env python
r"""Composing two models: FlamingMoE's `model` IO function on CALM's key-value task (CPU).

    python tools/flaming_io_compose.py [--steps-a 600] [--steps 300] [--names 200] [--unseen 50]

Facts "the code of <name> is <code>" as in tools/flaming_io_knowledge.py (F: all facts).
  Model A   a tiny transformers MistralForCausalLM trained on every fact of F (it memorises
            them), saved with save_pretrained: the frozen augmenting model.
  Model B   a Neon model trained on the facts of F1 (a subset of F) with A as a routed `model`
            function (its last-layer state, a learned projection into B's residual); evaluated
            on the facts of F not in F1, which B never saw: only A knows their codes.

Reports the answer-token loss (nats, mean over the 2 code tokens of each evaluation fact):
  B + trained A     the composition
  B + untrained A   the same, with an A of the same shape never trained (random states)
  B alone           B trained the same steps without the IO function
  A itself          the frozen model's own answer loss on the evaluation facts (what it knows)
and the mean training step time of B with A against B alone, and A's share of B + A's step
(FrozenModel.seconds: A's forward passes, re-tokenization included).
Pass: B + trained A <= 0.5 x B alone and <= 0.5 x B + untrained A.
"""

import argparse
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

from tools.flaming_io_knowledge import (  # noqa: E402
    ANSWER_OFFSETS,
    CODE_TOKENS,
    FACT_LEN,
    FACTS_PER_SEQ,
    VOCAB,
    answer_loss,
    batch,
    init_single_process,
    make_facts,
    train,
)


def model_a(path: str, facts, steps: int, seed: int, hidden: int = 64, batch_size: int = 16) -> str:
    """Train (steps > 0) a tiny MistralForCausalLM on `facts`; save it to `path`."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = MistralForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        seqs = batch(facts, batch_size, gen)
        loss = model(input_ids=seqs, labels=seqs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    return path


def a_answer_loss(path: str, seqs: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    with torch.no_grad():
        logits = model(input_ids=seqs[:, :-1]).logits
    targets = [f * FACT_LEN + o for f in range(FACTS_PER_SEQ) for o in ANSWER_OFFSETS]
    lp = torch.log_softmax(logits[:, [t - 1 for t in targets]], dim=-1)
    return -lp.gather(-1, seqs[:, targets].unsqueeze(-1)).mean().item()


def config_b(frozen: str | None):
    from neon.config import NeonConfig

    io = dict(flaming_moe="between", flaming_layer_functions=0, flaming_topk=1, flaming_router="topk",
              flaming_io_context_window=1,
              flaming_io_functions=[f"name=a,kind=model,source={frozen},layer=-1"])
    return NeonConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=VOCAB,
                      max_position_embeddings=32, pipeline_dtype=torch.float32, **(io if frozen else {}))


def train_b(cfg, facts, steps: int, seed: int, batch_size: int = 16, lr: float = 3e-3):
    """Model B trained on `facts`; returns (model, mean step seconds after the first 5 steps (all
    steps in a shorter run), the frozen model's share of the training time)."""
    times = []
    model = train(cfg, facts, steps, seed, batch_size, lr, step_times=times)
    frozen = sum(p.seconds for p in getattr(model, "io_providers", ()) if hasattr(p, "seconds"))  # FrozenModels
    timed = times[5:] or times
    return model, sum(timed) / max(1, len(timed)), frozen / max(sum(times), 1e-9)


def run(steps_a: int = 600, steps: int = 300, names: int = 200, unseen: int = 50, seed: int = 0,
        workdir: str | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    facts = make_facts(names + unseen, gen)
    f1, held_out = facts[:names], facts[names:]
    workdir = workdir or tempfile.mkdtemp(prefix="flaming_compose_")
    trained = model_a(os.path.join(workdir, "a_trained"), facts, steps_a, seed)
    untrained = model_a(os.path.join(workdir, "a_untrained"), facts, 0, seed)
    eval_seqs = batch(held_out, 64, torch.Generator().manual_seed(seed + 1))
    b_a, t_a, share = train_b(config_b(trained), f1, steps, seed)
    b_u, _, _ = train_b(config_b(untrained), f1, steps, seed)
    b, t_b, _ = train_b(config_b(None), f1, steps, seed)
    return {"B + trained A": answer_loss(b_a, eval_seqs), "B + untrained A": answer_loss(b_u, eval_seqs),
            "B alone": answer_loss(b, eval_seqs), "A itself": a_answer_loss(trained, eval_seqs),
            "chance": math.log(CODE_TOKENS), "step s, B + A": t_a, "step s, B alone": t_b,
            "A's share of B + A's step": share}


def passed(r: dict) -> bool:
    return r["B + trained A"] <= 0.5 * min(r["B alone"], r["B + untrained A"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps-a", type=int, default=600, help="training steps of model A (all facts)")
    p.add_argument("--steps", type=int, default=300, help="training steps of model B (facts of F1)")
    p.add_argument("--names", type=int, default=200, help="facts in F1")
    p.add_argument("--unseen", type=int, default=50, help="facts in F but not F1 (evaluation)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(4, os.cpu_count() or 1)))
    init_single_process()
    r = run(args.steps_a, args.steps, args.names, args.unseen, args.seed)
    for k, v in r.items():
        print(f"{k:>16}: {v:.4f}" + ("" if k.startswith(("step", "A's")) else " nats"))
    ratio = r["B + trained A"] / min(r["B alone"], r["B + untrained A"])
    overhead = r["step s, B + A"] / r["step s, B alone"] - 1
    print(f"step-time overhead of A: {100 * overhead:+.0f}%")
    print(f"B + trained A / min(others) = {ratio:.2f}: {'PASS' if passed(r) else 'FAIL'} (<= 0.5)")
    return 0 if passed(r) else 1


if __name__ == "__main__":
    sys.exit(main())
