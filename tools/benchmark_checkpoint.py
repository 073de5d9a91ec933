"""The training loop's time per checkpoint, synchronous against asynchronous (--async-save), in
the same run of pretrain_neon.py's loop (single process, the demo corpus unless --data-path is
given), at a model size where a save takes seconds.

    python tools/benchmark_checkpoint.py [--layers 8] [--hidden 1024] [--saves 3] [pretrain_neon.py flags ...]

Each mode trains `2 x saves` steps and saves every 2 steps into a directory of its own; printed per
mode: the checkpoint's size, the loop's seconds per save (the time between the end of the step
before the save and the start of the step after it, from the run's own log lines: synchronous,
the whole write; asynchronous, the hand-over to the writer process), the median step time with
and without a save in flight, and the ratio sync / async. The two modes run one after the other
in one invocation, so they see the same machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAVED = re.compile(r" saved checkpoint \S+ at iteration (\d+) in ([\d.]+) s")
STARTED = re.compile(r" started the checkpoint of iteration (\d+) \(asynchronously: the training loop waited "
                     r"([\d.]+) s\)")
STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ .*elapsed time per iteration \(ms\): ([\d.]+)")


def run(mode: str, args, extra: list[str], work: Path) -> dict:
    save = work / mode
    steps = 2 * args.saves
    cmd = [sys.executable, str(REPO / "pretrain_neon.py"), *extra, "--num-layers", str(args.layers), "--hidden-size",
           str(args.hidden), "--num-attention-heads", str(max(1, args.hidden // 64)), "--num-query-groups",
           str(max(1, args.hidden // 64)), "--ffn-hidden-size", str(4 * args.hidden),
           "--train-iters", str(steps), "--save", str(save), "--save-interval", "2", "--ckpt-keep-last", "1",
           "--eval-iters", "0", "--log-interval", "1", "--no-progress-bar", "--lr-warmup-iters", "1",
           *(["--async-save"] if mode == "async" else [])]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{mode} run failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    text = out.stdout + out.stderr
    saves = [float(s) for _, s in (SAVED if mode == "sync" else STARTED).findall(text)]
    steps_ms = {int(i): float(ms) for i, ms in STEP.findall(text)}
    size = sum(f.stat().st_size for f in save.rglob("*") if f.is_file() and f.parent.name.startswith("iter_"))
    # steps right after a save was started (the async writer running) against the others
    after = [steps_ms[i] for i in steps_ms if i % 2 == 1 and i > 1]
    return dict(saves=saves, size=size, after=after, steps=[steps_ms[i] for i in steps_ms if i > 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--saves", type=int, default=3)
    args, extra = parser.parse_known_args(argv)
    sys.path.insert(0, str(REPO / "tools"))
    from benchmark_pretrain import demo_defaults

    # the base model: the save's cost
    extra = demo_defaults(extra) + ["--diff-attention", "off", "--no-ngpt", "--flaming-moe", "off"]
    (REPO / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as tmp:
        results = {mode: run(mode, args, extra, Path(tmp)) for mode in ("sync", "async")}
    size = results["sync"]["size"]
    print(f"model: {args.layers} layers x {args.hidden} (the demo config's other settings), checkpoint "
          f"{size / 2**20:.0f} MiB (model, Adam state, RNG), {args.saves} saves per mode")
    print(f"{'mode':<7}{'loop s/save':>13}{'saves':>26}{'step ms':>10}{'step ms after a save':>22}")
    for mode, r in results.items():
        print(f"{mode:<7}{statistics.median(r['saves']):>13.3f}{str([round(s, 2) for s in r['saves']]):>26}"
              f"{statistics.median(r['steps']):>10.0f}{statistics.median(r['after']):>22.0f}")
    ratio = statistics.median(results["sync"]["saves"]) / statistics.median(results["async"]["saves"])
    print(f"the loop's time per save, sync / async: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
