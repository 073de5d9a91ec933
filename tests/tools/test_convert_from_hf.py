"""tools/convert_from_hf.py: a Hugging Face Mistral model becomes a Neon checkpoint; exporting it
again gives back every tensor bit for bit; pretrain_neon.py continues training from it at
TP=2 x PP=2 (weights only: fresh optimizer, iteration 0); bad inputs fail with errors naming the
problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tools.conversion_helpers import ROOT, env, run_tool, train

MISTRAL = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.1,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def save_mistral(path, tokenizer=None, seed=0, dtype=torch.float32, **overrides):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**{**MISTRAL, **overrides})).to(dtype)
    model.save_pretrained(path, max_shard_size="60KB")
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.model")
    return model


def tensors(hf_dir) -> dict:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_identical(a, b):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_tokenizer):
    """An HF Mistral (fp32, sliding window, sharded, with tokenizer.model) imported for TP2 x PP2."""
    work = tmp_path_factory.mktemp("import")
    save_mistral(work / "hf", tokenizer=tiny_tokenizer, sliding_window=7, rope_theta=50000.0)
    done = run_tool("convert_from_hf", "--hf", work / "hf", "--save", work / "ckpt",
                    "--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2)
    assert done.returncode == 0, done.stderr[-4000:]
    return work


def test_round_trip_is_bit_identical(imported, tmp_path):
    ckpt = imported / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (ckpt / "tokenizer.model").is_file() and (ckpt / "model.yaml").is_file()
    done = run_tool("convert_to_hf", "--load", ckpt, "--save", tmp_path / "back")  # tokenizer: the imported one
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (imported / "hf" / "tokenizer.model").read_bytes()
    assert_identical(tensors(imported / "hf"), tensors(tmp_path / "back"))
    before, after = (json.loads((d / "config.json").read_text()) for d in (imported / "hf", tmp_path / "back"))
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
                "num_attention_heads", "num_key_value_heads", "sliding_window", "rope_parameters", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "dtype"):
        assert before[key] == after[key], key

    # a bf16 model with tied embeddings, both directions in one process (library calls)
    script = textwrap.dedent(f"""
        import torch
        from tests.tools.test_convert_from_hf import save_mistral
        from neon.conversion.convert import export_to_hf, import_from_hf
        from pathlib import Path
        w = Path({str(tmp_path)!r})
        save_mistral(w / "hf16", seed=1, dtype=torch.bfloat16, tie_word_embeddings=True)
        import_from_hf(w / "hf16", w / "ckpt16", tensor_parallel=2, progress=False)
        export_to_hf(w / "ckpt16", w / "back16", with_tokenizer=False, progress=False)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    a, b = tensors(tmp_path / "hf16"), tensors(tmp_path / "back16")
    assert "lm_head.weight" not in b and a["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert_identical(a, b)


def test_pretrain_continues_from_imported_mistral(imported, tiny_tokenizer, tiny_dataset, tmp_path):
    """Weights-only checkpoint: training at TP2 x PP2 starts at iteration 0 from the imported
    weights (a tiny learning rate barely moves them; a fresh init would be far away)."""
    ckpt = imported / "ckpt"
    prefix, _ = tiny_dataset
    log = train(tmp_path / "cpt", str(tiny_tokenizer), prefix, nproc=4, model=False,
                config=ckpt / "model.yaml", load=ckpt, tensor_model_parallel_size=2,
                pipeline_model_parallel_size=2, train_iters=2, lr=1e-6, min_lr=1e-7, lr_warmup_iters=0)
    assert "loaded checkpoint" in log and "iteration 0" in log, log[-3000:]
    assert (tmp_path / "cpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    done = run_tool("convert_to_hf", "--load", tmp_path / "cpt", "--save", tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-4000:]
    start, trained = tensors(imported / "hf"), tensors(tmp_path / "hf")
    assert set(start) == set(trained)
    moved = max((start[k] - trained[k]).abs().max().item() for k in start)
    # Bound: in its first two steps Adam moves a weight by at most lr per step (|m_hat / sqrt(v_hat)|
    # <= 1 for t <= 2 with betas 0.9 / 0.95), decoupled weight decay by lr * wd * |w|, and the fp32
    # result rounds to within one ulp; the learning rate starts at 1e-6 and decays: two steps of <= 1e-6.
    wd = yaml.safe_load((tmp_path / "cpt" / "config.yaml").read_text())["optimizer"]["weight_decay"]
    w_max = max(t.abs().max().item() for t in start.values())
    bound = 2 * 1e-6 * (1 + wd * w_max) + 2 * 2.0 ** -23 * w_max
    assert 0 < moved <= bound, (moved, bound)


def test_import_errors_name_the_problem(imported, tmp_path, tiny_tokenizer):
    """Found before anything is built (in-process calls raise before the process group starts)."""
    from neon.conversion.convert import import_from_hf
    from neon.conversion.errors import ConversionError

    def fails(hf, *words, **kwargs):
        with pytest.raises(ConversionError) as err:
            import_from_hf(hf, tmp_path / "never", progress=False, **kwargs)
        for word in words:
            assert word in str(err.value), (word, str(err.value))
        assert not (tmp_path / "never").exists()

    hf = imported / "hf"
    llama = shutil.copytree(hf, tmp_path / "llama")
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    fails(llama, "unknown architecture", "'llama'")

    partial = shutil.copytree(hf, tmp_path / "partial")
    shard = sorted(partial.glob("model-*.safetensors"))[1]
    shard.unlink()
    fails(partial, "missing safetensors shard", shard.name)

    small = shutil.copytree(hf, tmp_path / "small")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    fails(small, "512 pieces", "vocab_size 256")

    fails(hf, "--tensor-model-parallel-size 3", tensor_parallel=3)
    fails(tmp_path / "nowhere", "no config.json")
    done = run_tool("convert_from_hf", "--hf", hf, "--save", imported / "ckpt")
    assert done.returncode == 2 and "already holds a Neon checkpoint" in done.stderr, done.stderr[-2000:]
