"""Shared pieces of the conversion tests: run the real command lines (pretrain_neon.py under
torchrun, tools/convert_*.py) with timeouts, and megatron's logits of a saved checkpoint at its
training layout (run in real gloo processes by tests.dist.run_distributed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.neon.training.runs import as_flags

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="offline")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(name, None)
    return e


def run_tool(name: str, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


TINY_MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  max_position_embeddings=64)


def pretrain_args(save: Path, tokenizer: str, data: str, model: bool = True, **settings) -> list[str]:
    """pretrain_neon.py flags for a few steps (of the tiny model unless model=False); settings use
    flag names with '_'."""
    values = dict(TINY_MODEL if model else {})
    values.update(seq_length=32, micro_batch_size=2, global_batch_size=4, train_iters=3, lr=3e-3, min_lr=3e-4,
                  lr_warmup_iters=1, eval_iters=0, log_interval=1, split="98,2,0", num_workers=0, seed=7, save=save)
    values.update(settings)
    return ["--data-path", data, "--tokenizer-model", tokenizer, "--no-progress-bar", *as_flags(values)]


def train(save: Path, tokenizer: str, data: str, nproc: int, timeout: float = 300, model: bool = True,
          **settings) -> str:
    """Run pretrain_neon.py under torchrun; returns its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(ROOT / "pretrain_neon.py"), *pretrain_args(save, tokenizer, data, model, **settings)]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout + out.stderr


def run_tool_many(name: str, argvs: list[list], timeout: float = 300) -> tuple[list[int], str]:
    """tools/<name>.py's main(argv) for each argv in ONE process (one start-up instead of many);
    returns the exit statuses and the output."""
    script = (f"import importlib.util, json, os, sys\n"
              f"spec = importlib.util.spec_from_file_location('tool', {str(ROOT / 'tools' / (name + '.py'))!r})\n"
              f"tool = importlib.util.module_from_spec(spec); spec.loader.exec_module(tool)\n"
              f"codes = []\n"
              f"for argv in {[[str(a) for a in argv] for argv in argvs]!r}:\n"
              f"    os.environ.pop('MASTER_PORT', None)\n"
              f"    codes.append(tool.main(argv))\n"
              f"print('EXIT CODES', json.dumps(codes))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-5000:]
    codes = json.loads(out.stdout.split("EXIT CODES", 1)[1])
    return codes, out.stdout + out.stderr


def train_and_reference(runs: list[list[str]], tokens, expert_parallel: int = 1):
    """In each rank of a torchrun launch: pretrain (neon.training.trainer.pretrain, what
    pretrain_neon.py runs) each argv in turn, then megatron's logits of each saved checkpoint at
    this layout. `expert_parallel` is set after resolve(): its validation does not know
    FlamingMoE's banks yet (it asks for num_moe_experts with EP > 1)."""
    from neon.training.config import resolve
    from neon.training.trainer import pretrain

    saves = []
    for argv in runs:
        cfg = resolve(argv, world_size=int(os.environ["WORLD_SIZE"]))
        cfg.parallelism.expert_model_parallel_size = expert_parallel
        pretrain(cfg)
        saves.append(cfg.checkpointing.save)
    return megatron_logits(saves, tokens)


def train_with_reference(work: Path, runs: list[list[str]], tokens, nproc: int = 4, expert_parallel: int = 1,
                         timeout: float = 600) -> list:
    """One torchrun launch (megatron's checkpoint writer needs non-daemonic ranks) of
    train_and_reference; returns the logits of each run."""
    import torch

    work.mkdir(parents=True, exist_ok=True)
    spec = work / "spec.pt"
    torch.save(dict(runs=runs, tokens=tokens, expert_parallel=expert_parallel, out=str(work / "logits.pt")), spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "tests.tools.conversion_helpers", str(spec)]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return torch.load(work / "logits.pt")


def megatron_logits(checkpoints: list[str], tokens):
    """Full-vocabulary logits of each checkpoint, loaded at the current (training) layout with
    pretrain's loader, from megatron's forward-only schedule (None on ranks without them)."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    from neon.model import build_model
    from neon.training import checkpointing
    from neon.training.config import from_dict
    from tests.parity import forward_logits

    results = []
    for root in checkpoints:
        path = checkpointing.iteration_dir(root, checkpointing.latest_iteration(root))
        run = dist_checkpointing.load_common_state_dict(str(path))["config"]
        config = from_dict(run, world_size=torch.distributed.get_world_size()).neon_config()
        model = build_model(config, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage())
        checkpointing.load(root, [model], None, None, load_optimizer=False, load_rng=False)
        model.eval()
        with torch.no_grad():
            logits = forward_logits(model, config, tokens)
        results.append(None if logits is None else logits.float())
    return results


if __name__ == "__main__":
    import torch

    from megatron_plugins import distributed

    spec = torch.load(sys.argv[1])
    logits = train_and_reference(spec["runs"], spec["tokens"], spec["expert_parallel"])
    if logits[0] is not None and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        torch.save(logits, spec["out"])
    distributed.shutdown()
