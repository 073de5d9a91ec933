"""Training and validation loss curves of one or more runs, overlaid, to a PNG.

    python tools/plot_metrics.py RUN_DIR_OR_METRICS_JSONL [...] [--out loss.png] [--labels a b]

Each input is a run directory holding metrics.jsonl (what pretrain_neon.py writes) or the file
itself. Training loss is drawn solid, validation loss dashed with markers, against tokens seen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train, valid) records by iteration; a resumed run's later record for an iteration wins."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"plot_metrics.py: error: {path} not found. Fix: give a run directory of pretrain_neon.py "
                         f"(its --save or --run-dir) or a metrics.jsonl file.")
    train, valid = {}, {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"plot_metrics.py: skipping unreadable line {n} of {path}", file=sys.stderr)
            continue
        (train if record.get("kind") == "train" else valid)[record["iteration"]] = record
    return train, valid


def plot(inputs: list[Path], out: Path, labels: list[str] | None = None, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, path in enumerate(inputs):
        label = labels[i] if labels and i < len(labels) else (path.name if path.is_dir() else path.parent.name)
        train, valid = read_metrics(path)
        color = f"C{i}"
        if train:
            its = sorted(train)
            ax.plot([train[k].get("consumed_tokens", k) for k in its], [train[k]["loss"] for k in its],
                    color=color, label=f"{label} train")
        if valid:
            its = sorted(valid)
            seq = _tokens_per_sample(train)
            ax.plot([valid[k].get("consumed_samples", k) * seq for k in its], [valid[k]["loss"] for k in its],
                    color=color, linestyle="--", marker="o", label=f"{label} validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "Neon pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _tokens_per_sample(train: dict) -> int:
    for record in train.values():
        if record.get("consumed_samples"):
            return record["consumed_tokens"] // record["consumed_samples"]
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="run directories or metrics.jsonl files")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG to write (default: loss.png)")
    parser.add_argument("--labels", nargs="+", help="one legend label per input (default: directory names)")
    parser.add_argument("--title", help="plot title")
    args = parser.parse_args(argv)
    print(plot(args.inputs, args.out, args.labels, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
