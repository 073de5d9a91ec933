#!/usr/bin/env python
r"""Export a Neon checkpoint (any TP/PP/EP layout) to a Hugging Face model directory, in one
process, no GPU needed.

    python tools/convert_to_hf.py --load checkpoints/neon --save hf/neon [--iteration 2000]

writes config.json, generation_config.json, model-0000X-of-0000N.safetensors +
model.safetensors.index.json, the tokenizer (sentencepiece: tokenizer.model, tokenizer_config.json,
tokenization_neon.py; Hugging Face: tokenizer.json, tokenizer_config.json) and, for a model with
Neon features on, configuration_neon.py, modeling_neon.py and the IO kinds' modules it uses
(neon/io/, FlamingMoE's IO functions; their sources, a store, a callable or a frozen model, are
referenced in config.json, not copied). Load with:

    AutoModelForCausalLM.from_pretrained(dir)                          # every Neon feature off: Mistral
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)  # Neon features on
    AutoTokenizer.from_pretrained(dir, trust_remote_code=True)         # exactly the training ids

See docs/hf_conversion.md. Exit status 2: the checkpoint, tokenizer or destination cannot be used.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (pretrain_neon.py --save)")
    p.add_argument("--save", required=True, help="Hugging Face directory to write (must be new or empty)")
    p.add_argument("--iteration", type=int, default=None,
                   help="iteration to export (default: the one latest_checkpointed_iteration.txt names)")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model or Hugging Face tokenizer directory (default: the "
                   "data.tokenizer_model saved in the checkpoint)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    from neon.conversion.convert import export_to_hf
    from neon.errors import NeonError

    try:
        out = export_to_hf(args.load, args.save, iteration=args.iteration, tokenizer_model=args.tokenizer_model,
                           with_tokenizer=not args.no_tokenizer, max_shard_size=args.max_shard_size,
                           overwrite=args.overwrite, progress=not args.quiet)
    except NeonError as e:
        print(f"convert_to_hf.py: error: {e}", file=sys.stderr)
        return e.exit_status
    finally:
        from megatron_plugins import distributed

        distributed.shutdown()
    print(f" wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
