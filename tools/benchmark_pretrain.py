"""Framework overhead of pretrain_neon.py: its training tokens/s against a bare loop of
megatron-core's train_step over the same model and a fixed batch, in the same process.

    python tools/benchmark_pretrain.py [--config examples/configs/cpu_demo.yaml] [--steps 30] [--warmup 5]
                                       [pretrain_neon.py flags ...]

Order: bare loop, pretrain_neon (the real run: data loader, scheduler, finite-loss and signal
checks, logging, metrics.jsonl), bare loop again; the baseline is the mean of the two bare runs.
Steady-state step times (after --warmup steps) are compared. Data: the demo corpus
(prepare_demo_data) unless --data-path/--tokenizer-model are given. Single process (world 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_loop(cfg, batch, steps: int, warmup: int) -> list[float]:
    """Step times of train_step alone: same model, optimizer and schedule, one batch repeated."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_plugins import distributed
    from neon.model import build_model
    from neon.training.optim import build_optimizer, optimizer_config
    from neon.training.step import build_model_chunks, train_step

    p, s = cfg.parallelism, cfg.schedule
    distributed.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                           p.expert_model_parallel_size, cfg.virtual_pipeline_size, s.seed)
    config = cfg.neon_config()
    chunks = build_model_chunks(config, build_model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=p.use_distributed_optimizer))
    optimizer = build_optimizer(chunks, optimizer_config(cfg))
    data = itertools.repeat(batch)
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(chunks, optimizer, data, config, num_microbatches=cfg.num_microbatches,
                   seq_length=cfg.data.seq_length, micro_batch_size=s.micro_batch_size)
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def framework(cfg, steps: int, warmup: int, run_dir: Path) -> list[float]:
    from neon.training.trainer import pretrain

    cfg.logging.log_interval = 1
    cfg.logging.run_dir = str(run_dir)
    cfg.logging.progress_bar = False
    pretrain(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records if r["kind"] == "train" and r["iteration"] > warmup]


def demo_defaults(extra: list[str]) -> list[str]:
    """pretrain_neon.py flags with the demo's config and data where `extra` gives none (the demo
    data is prepared on first use)."""
    if "--config" not in extra:
        extra = ["--config", str(REPO / "examples" / "configs" / "cpu_demo.yaml"), *extra]
    if "--data-path" not in extra:
        from neon.data.corpus import prepare_demo_data

        tokenizer, prefix = prepare_demo_data(REPO / "runs" / "demo" / "data", 2048, show_progress=False)
        extra = [*extra, "--data-path", str(prefix), "--tokenizer-model", str(tokenizer)]
    return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args, extra = parser.parse_known_args(argv)
    extra = demo_defaults(extra)
    from neon.training.config import resolve

    cfg = resolve([*extra, "--eval-iters", "0", "--num-workers", "1", "--save", "unused",
                   "--train-iters", str(args.warmup + args.steps), "--lr-warmup-iters", "1"], world_size=1)
    cfg.checkpointing.save = cfg.checkpointing.load = None
    cfg.checkpointing.save_interval = None

    from torch.utils.data import DataLoader

    from neon.data import NeonTokenizer, build_split_datasets

    tok = NeonTokenizer(cfg.data.tokenizer_model)
    train, _, _ = build_split_datasets(cfg.data.data_path, cfg.data.split, cfg.data.seq_length,
                                       (cfg.schedule.micro_batch_size, 0, 0), cfg.schedule.seed, cfg.model.vocab_size,
                                       tok.eod)
    batch = next(iter(DataLoader(train, batch_size=cfg.schedule.micro_batch_size)))

    tokens = cfg.schedule.global_batch_size * cfg.data.seq_length
    bare1 = bare_loop(cfg, batch, args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        ours = framework(cfg, args.steps, args.warmup, Path(tmp))
    bare2 = bare_loop(cfg, batch, args.steps, args.warmup)
    base = statistics.mean(bare1 + bare2)
    mine = statistics.mean(ours)
    print(f"\nmodel: {cfg.model.num_layers} x {cfg.model.hidden_size}, seq {cfg.data.seq_length}, "
          f"global batch {cfg.schedule.global_batch_size} ({tokens} tokens/step), {args.steps} steps after "
          f"{args.warmup} warmup")
    print(f"{'run':<28}{'s/step':>10}{'tokens/s':>12}")
    for name, t in (("bare train_step (1st)", statistics.mean(bare1)), ("pretrain_neon.py loop", mine),
                    ("bare train_step (2nd)", statistics.mean(bare2))):
        print(f"{name:<28}{t:>10.4f}{tokens / t:>12.0f}")
    print(f"overhead of pretrain_neon.py vs bare mean: {100 * (mine / base - 1):+.1f}% "
          f"(tokens/s ratio {base / mine:.3f}; goal < 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
