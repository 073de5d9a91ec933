#!/usr/bin/env python
r"""Evaluate a Neon checkpoint on downstream tasks with EleutherAI's lm-evaluation-harness, in one
process (the checkpoint is resharded from its saved TP/PP/EP layout to one process, as the HF
export does), no GPU needed.

    python tools/evaluate.py --load checkpoints/neon --tasks hellaswag lambada_openai arc_easy
    python tools/evaluate.py --load runs/demo/checkpoints --tasks neon_cloze neon_choice \
        --include-path runs/demo/eval_tasks --limit 64 --output results.json

Tasks are lm-eval's (`lm_eval ls tasks`; their datasets download from the Hugging Face hub) or
those of a folder of task YAMLs (--include-path). Prints one line per task and metric, and with
--output writes {"metrics": ..., "checkpoint": ..., "iteration": ...} as JSON. IO functions run as
in training. At the checkpoint's own layout (several processes): `torchrun ... pretrain_neon.py
--load CKPT --skip-train --eval-tasks ...`. See docs/evaluation.md. Exit status 2: the checkpoint,
tokenizer or a task cannot be used.
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed")  # megatron-core's import


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (pretrain_neon.py --save)")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names")
    p.add_argument("--include-path", default=None, help="a folder of task YAMLs besides lm-eval's registry")
    p.add_argument("--iteration", type=int, default=None, help="iteration (default: the latest)")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer (default: the one saved in the checkpoint)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--output", default=None, help="write the results here as JSON")
    p.add_argument("--log-samples", action="store_true", help="with --output: also each document's requests and "
                   "responses (lm-eval's samples)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    from neon.conversion import neon_checkpoint
    from neon.conversion.hf_dir import load_tokenizer
    from neon.errors import NeonError
    from neon.evaluation.forward import ModelLogits
    from neon.evaluation.harness import NeonLM
    from neon.evaluation.tasks import check_tasks, run_tasks, task_manager

    try:
        manager = task_manager(args.include_path, args.tasks)
        check_tasks(args.tasks, args.include_path, manager)  # before the model is loaded
        ckpt = neon_checkpoint.locate(args.load, args.iteration)
        data = ckpt.run_config.get("data") or {}
        tokenizer = load_tokenizer(args.tokenizer_model or data.get("tokenizer_model"),
                                   None if args.tokenizer_model else data.get("tokenizer_type"))
        model, _, config = neon_checkpoint.load_model(ckpt)
        lm = NeonLM(ModelLogits([model], config.vocab_size), tokenizer, max_length=config.max_position_embeddings,
                    batch_size=args.batch_size, show_progress=not args.quiet)
        results = run_tasks(lm, args.tasks, include_path=args.include_path, limit=args.limit,
                            num_fewshot=args.num_fewshot, log_samples=args.log_samples, manager=manager)
    except NeonError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return e.exit_status
    finally:
        from megatron_plugins import distributed

        distributed.shutdown()
    for task, metrics in results["metrics"].items():
        for name, value in metrics.items():
            print(f" {task} {name}: {value:.4f}")
    if args.output:
        record = {"metrics": results["metrics"], "checkpoint": str(ckpt.path), "iteration": ckpt.iteration}
        if args.log_samples:
            record["samples"] = results["samples"]
        with open(args.output, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
