"""Conversion between Neon distributed checkpoints and Hugging Face model directories.

    neon_checkpoint   read (any TP/PP/EP layout, one process) and write (weights only) Neon checkpoints
    hf_dir            read and write HF directories: sharded safetensors + index, configs, code, tokenizer
    convert           the two directions, tensor by tensor through neon/state_dict_adapter.py

The command lines are tools/convert_to_hf.py and tools/convert_from_hf.py (docs/hf_conversion.md).
"""
