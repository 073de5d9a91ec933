"""Train Neon variants (base, diff, ngpt, diff+ngpt, flaming, all, YAML overlays) over a
learning-rate grid with pretrain_neon.py and compare them at their best rates.

    python tools/ablate.py                                  # the demo: every variant on the demo corpus
    python tools/ablate.py --variants base ngpt --config my.yaml --train-iters 2000
    python tools/ablate.py --slurm --sbatch-args "--nodes=1 --partition=gpu"   # rounds as job arrays

Writes WORK/ablation.md, ablation.json and ablation.png (default WORK: runs/ablate); rerunning
resumes. See docs/ablations.md; the logic lives in neon/ablation/.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon.ablation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
