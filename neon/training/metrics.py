"""What a run reports: Megatron-style console lines, metrics.jsonl, TensorBoard, wandb, a tqdm bar.

Only the process that owns the logger (global rank 0) writes; the loop hands it values that are
already reduced over the job. The wandb API key is never read here: wandb takes WANDB_API_KEY
from the environment itself (WANDB_MODE=offline writes a local run to sync later).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from neon.training.config import LoggingConfig, ScheduleConfig

# Dense BF16 peak TFLOP/s per device, for the MFU estimate.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gb() -> float:
    """Peak accelerator memory of this process, or its resident memory on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


@dataclass
class _Window:
    steps: int = 0
    time_s: float = 0.0
    loss_sum: float = 0.0
    grad_norm_sum: float = 0.0
    grad_norm_count: int = 0
    skipped: int = 0
    aux: dict = field(default_factory=dict)


class MetricsLogger:
    """Built from the run's `logging` section (intervals, sinks, progress bar, peak TFLOP/s) and
    what a step's numbers need: `schedule` (train_iters, global_batch_size), the sequence length,
    the model's FLOPs per token (neon.flops, causal attention at half: `mfu`; and, if
    given, at full: `mfu_full_attention`) and the number of devices."""

    def __init__(self, settings: LoggingConfig, schedule: ScheduleConfig, *, seq_length: int,
                 flops_per_token: float, num_devices: int, run_dir: Path, start_iteration: int = 0,
                 run_config: Optional[dict] = None, enabled: bool = True, stream=None,
                 flops_per_token_full_attention: Optional[float] = None):
        self.enabled = enabled
        self.train_iters, self.log_interval = schedule.train_iters, settings.log_interval
        self.gbs, self.seq = schedule.global_batch_size, seq_length
        self.flops_per_token, self.num_devices = flops_per_token, num_devices
        self.flops_per_token_full = flops_per_token_full_attention
        self.peak = peak_tflops(settings.peak_tflops)
        self.window = _Window()
        self.stream = stream or sys.stdout
        self.jsonl = self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.jsonl = open(self.metrics_path, "a", buffering=1)
        if settings.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=settings.tensorboard_dir)
        if settings.wandb_project:
            import wandb

            wandb_dir = Path(settings.wandb_save_dir or run_dir / "wandb")
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=settings.wandb_project, name=settings.wandb_exp_name,
                                    dir=str(wandb_dir), config=run_config, resume="allow")
        if settings.progress_bar and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.train_iters, initial=start_iteration, desc="training", unit="it",
                            dynamic_ncols=True, file=self.stream)

    # --- output helpers ---------------------------------------------------------------------
    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _record(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        step = record["iteration"]
        prefix = record["kind"]  # train, valid, test
        scalars = {f"{prefix}/{k}": v for k, v in record.items()
                   if k not in ("kind", "iteration", "time") and isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    # --- events -------------------------------------------------------------------------------
    def train_step(self, *, iteration: int, loss: float, grad_norm: Optional[float], lr: float,
                   consumed_samples: int, step_time_s: float, skipped: bool, aux: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        w = self.window
        w.steps += 1
        w.time_s += step_time_s
        w.loss_sum += loss
        if grad_norm is not None:
            w.grad_norm_sum += grad_norm
            w.grad_norm_count += 1
        w.skipped += int(skipped)
        for k, v in (aux or {}).items():
            w.aux[k] = w.aux.get(k, 0.0) + v
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if iteration % self.log_interval and iteration != self.train_iters:
            return
        step_s = w.time_s / w.steps
        tokens_per_s = self.gbs * self.seq / step_s
        tflops = tokens_per_s * self.flops_per_token / self.num_devices / 1e12
        mfu = tflops / self.peak if self.peak else None
        full = {}  # the same step with causal attention counted at full (torchtitan's convention)
        if self.flops_per_token_full is not None:
            tflops_full = tokens_per_s * self.flops_per_token_full / self.num_devices / 1e12
            full = {"tflops_per_device_full_attention": tflops_full,
                    "mfu_full_attention": tflops_full / self.peak if self.peak else None}
        grad_norm_avg = w.grad_norm_sum / w.grad_norm_count if w.grad_norm_count else None
        record = {
            "kind": "train", "iteration": iteration, "consumed_samples": consumed_samples,
            "consumed_tokens": consumed_samples * self.seq, "lr": lr, "loss": w.loss_sum / w.steps,
            "grad_norm": grad_norm_avg, "step_time_s": step_s, "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops, "mfu": mfu, **full, "memory_gb": memory_gb(), "skipped": w.skipped,
            **{k: v / w.steps for k, v in w.aux.items()}, "time": time.time(),
        }
        self._record(record)
        parts = [
            f" [{datetime.now():%Y-%m-%d %H:%M:%S}] iteration {iteration:8d}/{self.train_iters:8d}",
            f"consumed samples: {consumed_samples:12d}",
            f"consumed tokens: {consumed_samples * self.seq:14d}",
            f"elapsed time per iteration (ms): {step_s * 1000:.1f}",
            f"learning rate: {lr:.6E}",
            f"global batch size: {self.gbs:5d}",
            f"lm loss: {record['loss']:.6E}",
            *[f"{k}: {v / w.steps:.6E}" for k, v in w.aux.items()],
            f"grad norm: {grad_norm_avg:.3f}" if grad_norm_avg is not None else "grad norm: n/a",
            f"tokens/s: {tokens_per_s:.0f}",
            f"TFLOP/s/device: {tflops:.4g}",
            f"MFU: {100 * mfu:.1f}%" if mfu is not None else "MFU: n/a",
            *([f"MFU (full attention): {100 * full['mfu_full_attention']:.1f}%"]
              if full.get("mfu_full_attention") is not None else []),
            f"memory (GB): {record['memory_gb']:.2f}",
            f"number of skipped iterations: {w.skipped:3d}",
        ]
        self.print(" | ".join(parts) + " |")
        self.window = _Window()

    def evaluation(self, *, iteration: int, loss: float, consumed_samples: int, split: str = "valid") -> None:
        """The loss on the validation split (or, split="test", on the test split after training)."""
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss))
        self._record({"kind": split, "iteration": iteration, "consumed_samples": consumed_samples,
                      "loss": loss, "ppl": ppl, "time": time.time()})
        where = "" if split == "valid" else f" on the {split} set"
        line = (f" validation loss at iteration {iteration}{where} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} | ")
        rule = "-" * len(line)
        self.print(f"{rule}\n{line}\n{rule}")

    def tasks(self, *, iteration: int, scores: dict, consumed_samples: int) -> None:
        """Downstream task scores ({task: {metric: value}}, lm-eval's)."""
        if not self.enabled:
            return
        flat = {f"{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}
        self._record({"kind": "tasks", "iteration": iteration, "consumed_samples": consumed_samples, **flat,
                      "time": time.time()})
        self.print(f" task scores at iteration {iteration} | "
                   + " | ".join(f"{name}: {value:.4f}" for name, value in flat.items()) + " |")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
