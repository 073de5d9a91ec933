#!/usr/bin/env python
r"""A Python callable as a FlamingMoE IO function: two-digit sums (CPU).

    python tools/flaming_io_arithmetic.py [--steps 150]

Sequences of problems "a1 a2 + b1 b2 = s1 s2 s3 ;" (digits as tokens). The callable
`next_sum_digit` (this file, source `flaming_io_arithmetic:next_sum_digit`) reads each routed
token's context row, finds the last '=' in it, adds the two numbers before it and returns the
next digit of the sum (-1 where there is none). A model with it and an identical model without
it train the same steps; reported: the loss on the result digits (nats), and chance log(10).
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))  # the callable's module

import torch  # noqa: E402

PLUS, EQ, SEMI = 10, 11, 12
VOCAB, WINDOW = 16, 9
PROBLEM_LEN, PROBLEMS_PER_SEQ = 10, 3  # a1 a2 + b1 b2 = s1 s2 s3 ;
RESULT_OFFSETS = (6, 7, 8)


def next_sum_digit(context: torch.Tensor) -> torch.Tensor:
    """[T, 2 + W] context rows -> [T, 1]: the next digit of a1a2 + b1b2 after the last '='."""
    out = torch.full((context.shape[0], 1), -1, dtype=torch.long)
    for r, row in enumerate(context[:, 2:].tolist()):
        if EQ not in row:
            continue
        e = len(row) - 1 - row[::-1].index(EQ)
        nums = row[e - 5:e]
        if e < 5 or nums[2] != PLUS or any(not 0 <= d <= 9 for d in nums[:2] + nums[3:]):
            continue
        total = f"{(nums[0] * 10 + nums[1]) + (nums[3] * 10 + nums[4]):03d}"
        k = len(row) - 1 - e  # result digits already written
        if k < 3:
            out[r, 0] = int(total[k])
    return out


def problems(n: int, gen) -> torch.Tensor:
    a, b = torch.randint(0, 100, (n,), generator=gen), torch.randint(0, 100, (n,), generator=gen)
    rows = [[x // 10, x % 10, PLUS, y // 10, y % 10, EQ, *map(int, f"{x + y:03d}"), SEMI]
            for x, y in zip(a.tolist(), b.tolist())]
    return torch.tensor(rows)


def batch(size: int, gen) -> torch.Tensor:
    return problems(size * PROBLEMS_PER_SEQ, gen).view(size, -1)  # [b, 30]


def config(with_callable: bool):
    from neon.config import NeonConfig

    io = dict(flaming_moe="between", flaming_layer_functions=0, flaming_topk=1, flaming_router="topk",
              flaming_io_context_window=WINDOW,
              flaming_io_functions=["name=add,kind=callable,source=flaming_io_arithmetic:next_sum_digit,width=1"])
    return NeonConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=VOCAB,
                      max_position_embeddings=32, pipeline_dtype=torch.float32, **(io if with_callable else {}))


def result_loss(model, seqs: torch.Tensor) -> float:
    pos = torch.arange(seqs.shape[1]).expand_as(seqs)
    with torch.no_grad():
        logits = model(seqs[:, :-1], pos[:, :-1], None).float()
    targets = [p * PROBLEM_LEN + o for p in range(PROBLEMS_PER_SEQ) for o in RESULT_OFFSETS]
    lp = torch.log_softmax(logits[:, [t - 1 for t in targets]], dim=-1)
    return -lp.gather(-1, seqs[:, targets].unsqueeze(-1)).mean().item()


def train(cfg, steps: int, seed: int, batch_size: int = 16, lr: float = 3e-3):
    from neon.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        seqs = batch(batch_size, gen)
        pos = torch.arange(seqs.shape[1] - 1).expand(seqs.shape[0], -1)
        loss = model(seqs[:, :-1], pos, None, labels=seqs[:, 1:]).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run(steps: int = 150, seed: int = 0) -> dict:
    eval_seqs = batch(64, torch.Generator().manual_seed(seed + 1))
    with_fn = result_loss(train(config(True), steps, seed), eval_seqs)
    without = result_loss(train(config(False), steps, seed), eval_seqs)
    return {"with callable": with_fn, "without": without, "chance": math.log(10)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from flaming_io_knowledge import init_single_process

    init_single_process()
    r = run(args.steps, args.seed)
    for k, v in r.items():
        print(f"{k:>14}: {v:.3f} nats")
    ok = r["with callable"] <= 0.5 * r["without"]
    print(f"with / without = {r['with callable'] / r['without']:.2f}: {'PASS' if ok else 'FAIL'} (<= 0.5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
