#!/usr/bin/env python
r"""Import a Hugging Face Mistral (or Neon) model into a Neon checkpoint that pretrain_neon.py
continues from (continued pretraining), in one process, no GPU needed.

    python tools/convert_from_hf.py --hf mistralai/Mistral-7B-v0.1-local-dir --save checkpoints/mistral \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    torchrun --nproc-per-node 4 pretrain_neon.py --config checkpoints/mistral/model.yaml \
        --load checkpoints/mistral --save checkpoints/cpt --data-path ... \
        --tokenizer-model checkpoints/mistral/tokenizer.model

writes a weights-only checkpoint (iter_0000000 + latest_checkpointed_iteration.txt, megatron-core
torch_dist; no optimizer state: training starts at iteration 0 with a fresh optimizer and
schedule), model.yaml (the model settings for --config) and a copy of tokenizer.model when the
HF directory has one. megatron-core reshards the checkpoint to the training layout on load; the
layout flags check that the model splits that way and are recorded in model.yaml.
See docs/hf_conversion.md. Exit status 2: the input or destination cannot be used.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="checkpoint directory to write (pretrain_neon.py --load)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --save")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    from neon.conversion.convert import import_from_hf
    from neon.errors import NeonError

    try:
        out = import_from_hf(args.hf, args.save, tensor_parallel=args.tensor_model_parallel_size,
                             pipeline_parallel=args.pipeline_model_parallel_size,
                             expert_parallel=args.expert_model_parallel_size, overwrite=args.overwrite,
                             progress=not args.quiet)
    except NeonError as e:
        print(f"convert_from_hf.py: error: {e}", file=sys.stderr)
        return e.exit_status
    finally:
        from megatron_plugins import distributed

        distributed.shutdown()
    print(f" wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
