"""tools/convert_to_hf.py: a tiny model trained a few steps by pretrain_neon.py at TP=2 x PP=2 is
exported in one process; transformers loads the directory (Mistral without remote code when every
Neon feature is off, NeonForCausalLM with trust_remote_code otherwise) and computes megatron's
logits (megatron loaded at the training layout); cached and uncached greedy generation agree; the
exported tokenizer gives sentencepiece's ids; bad checkpoints fail with errors naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from tests.data_helpers import sample_documents
from tests.tools.conversion_helpers import pretrain_args, run_tool, run_tool_many, train_with_reference

# feature combination -> pretrain_neon.py model flags, trained in launches of 4 ranks per layout
FLAMING = dict(flaming_moe="between", flaming_global_functions=4, flaming_layer_functions=4,
               flaming_global_kind="linear", flaming_layer_kind="swiglu", flaming_ffn_hidden_size=16,
               flaming_router="gumbel", flaming_topk=1, flaming_aux_loss_coeff=1e-2)
LAUNCHES = {
    "tp2-pp2": (dict(tp=2, pp=2), {
        "base": {},
        "diff-matched": dict(diff_attention="matched", num_attention_heads=8, num_query_groups=4),
        "diff-expressive": dict(diff_attention="expressive", tie_word_embeddings=True),
        "diff-v2": dict(diff_attention="v2"),
        "ngpt": dict(ngpt=True),
    }),
    "pp2-ep2": (dict(pp=2, ep=2), {
        "flaming": FLAMING,
        "diff-flaming": dict(FLAMING, diff_attention="matched", flaming_moe="mlp", flaming_layer_kind="lowrank",
                             flaming_lowrank_rank=4, flaming_topk=2, num_attention_heads=8, num_query_groups=4),
        "all": dict(FLAMING, diff_attention="matched", ngpt=True, num_attention_heads=8, num_query_groups=4),
    }),
}
FEATURES = {name: flags for _, combos in LAUNCHES.values() for name, flags in combos.items()}
TOKENS = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))
# The HF modules compute megatron's function with other kernels and, at TP2 x PP2, other splits of
# each sum: every op is within a few fp32 roundings, a reduction of n terms within n * 2^-24 of
# its terms' magnitude (Higham's gamma_n). R = 4 layers x 12 reductions (attention, MLP, the
# FlamingMoE routers and banks) + the head, n <= 96: R * n * 2^-24 = 2.8e-4 of the logits' scale
# in the worst case. A wrong weight mapping moves logits by ~1e-1.
EXPORT_ROUNDING = (4 * 12 + 1) * 96 * 2.0 ** -24


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer, tiny_dataset):
    """{feature: (checkpoint dir, HF dir)} and megatron's logits at the training layout: one launch
    of 4 ranks trains every combination (the library pretrain_neon.py runs) and computes the logits,
    one process exports them all through the command line's main()."""
    work = tmp_path_factory.mktemp("export")
    prefix, _ = tiny_dataset
    dirs = {name: (work / f"ckpt-{name}", work / f"hf-{name}") for name in FEATURES}
    reference = {}
    for layout, combos in LAUNCHES.values():
        runs = [pretrain_args(dirs[name][0], str(tiny_tokenizer), prefix,
                              tensor_model_parallel_size=layout.get("tp", 1),
                              pipeline_model_parallel_size=layout.get("pp", 1), **flags)
                for name, flags in combos.items()]
        logits = train_with_reference(work / f"launch-{'-'.join(combos)}", runs, TOKENS,
                                      expert_parallel=layout.get("ep", 1))
        reference.update(zip(combos, logits))
    codes, log = run_tool_many("convert_to_hf", [["--load", c, "--save", h, "--max-shard-size", "40KB"]
                                                 for c, h in dirs.values()])
    assert codes == [0] * len(FEATURES), log[-4000:]
    assert "writing safetensors" in log  # progress shown
    return dirs, reference


@pytest.mark.parametrize("feature", list(FEATURES))
def test_exported_model_matches_megatron(exported, feature):
    from transformers import AutoModelForCausalLM

    dirs, reference = exported
    hf_dir = dirs[feature][1]
    plain = feature == "base"
    config = json.loads((hf_dir / "config.json").read_text())
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, and the index lists every shard
    assert all((hf_dir / f).is_file() for f in index["weight_map"].values())
    assert (hf_dir / "generation_config.json").is_file()
    if plain:
        assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
        assert not list(hf_dir.glob("modeling_*.py")) and "auto_map" not in config  # no remote code
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
        assert type(model).__name__ == "MistralForCausalLM"
    else:
        assert config["model_type"] == "neon" and (hf_dir / "modeling_neon.py").is_file()
        model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
        assert type(model).__name__ == "NeonForCausalLM"
    model.eval()
    with torch.no_grad():
        logits = model(TOKENS).logits
        want = reference[feature]
        assert want.abs().max() > 0.1
        diff = (logits - want).abs().max().item()
        assert diff <= EXPORT_ROUNDING * want.abs().max().item(), (diff, want.abs().max().item())
        prompt = TOKENS[:, :6]
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (2, 18) and torch.equal(cached, uncached)


def test_exported_tokenizer_gives_sentencepiece_ids(exported, tiny_tokenizer):
    from transformers import AutoTokenizer

    dirs, _ = exported
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    texts = sample_documents(30) + ["  leading", "    indented\n\tcode:  x  =  1\n\n", "trailing   ", " ", "",
                                    "ünïcödé 漢字 🎉  two  spaces"]
    for name in ("base", "diff-matched"):
        tok = AutoTokenizer.from_pretrained(dirs[name][1], trust_remote_code=True)
        assert len(tok) == sp.GetPieceSize()
        assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (sp.eos_id(), sp.bos_id(), sp.pad_id())
        for text in texts:
            assert tok(text)["input_ids"] == sp.encode(text), repr(text)
        assert tok.decode(sp.encode(texts[1])) == texts[1]


def test_diff_v2_export_imports_back_bit_identical(exported, tmp_path):
    """DiffAttention V2 through both CLIs: the exported NeonForCausalLM imports at another layout
    (TP=2, PP=1; it was trained at TP=2 x PP=2) and exports again with every tensor (W_lambda
    included) and the layout setting unchanged."""
    from tests.tools.test_convert_from_hf import assert_identical, tensors

    dirs, _ = exported
    hf_dir = dirs["diff-v2"][1]
    done = run_tool("convert_from_hf", "--hf", hf_dir, "--save", tmp_path / "ckpt", "--tensor-model-parallel-size", 2)
    assert done.returncode == 0, done.stderr[-4000:]
    done = run_tool("convert_to_hf", "--load", tmp_path / "ckpt", "--save", tmp_path / "back")
    assert done.returncode == 0, done.stderr[-4000:]
    before, after = tensors(hf_dir), tensors(tmp_path / "back")
    assert any(k.endswith("self_attn.lambda_proj.weight") for k in before)
    assert_identical(before, after)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["diff_attention"] == "v2"


# --- errors ------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_errors_name_the_problem(exported, tmp_path):
    """Each problem is found before the model is loaded (in-process), and the command line exits
    with status 2 and the message, leaving no half-written directory."""
    from megatron.core import dist_checkpointing

    from neon.conversion.convert import export_to_hf
    from neon.conversion.errors import ConversionError

    dirs, _ = exported
    ckpt = dirs["base"][0]
    it_dir = ckpt / f"iter_{int((ckpt / 'latest_checkpointed_iteration.txt').read_text()):07d}"

    missing = _copy(ckpt, tmp_path / "missing")
    shard = sorted((missing / it_dir.name).glob("*.distcp"))[-1]
    shard.unlink()
    done = run_tool("convert_to_hf", "--load", missing, "--save", tmp_path / "out")
    assert done.returncode == 2 and "missing shard file" in done.stderr and shard.name in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()

    def fails(*words, **kwargs):
        kwargs.setdefault("load", ckpt)
        with pytest.raises(ConversionError) as err:
            export_to_hf(save=tmp_path / "never", progress=False, **kwargs)
        for word in words:
            assert word in str(err.value), (word, str(err.value))
        assert not (tmp_path / "never").exists()

    for key in ("format_version", "architecture"):
        bad = _copy(ckpt, tmp_path / key)
        common = dist_checkpointing.load_common_state_dict(str(bad / it_dir.name))
        if key == "format_version":
            common["format_version"] = 99
        else:
            common["config"]["model"]["flamingo_wings"] = 2
        torch.save(common, bad / it_dir.name / "common.pt")
        fails(*(["format_version=99"] if key == "format_version" else ["unknown architecture", "flamingo_wings"]),
              load=bad)

    big = tmp_path / "big_tok"  # 600 pieces: more than the model's 512
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_documents(400)), model_prefix=str(big),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, minloglevel=2)
    fails("600 tokens", "vocab_size is 512", tokenizer_model=f"{big}.model")
    fails("does not exist", tokenizer_model=str(tmp_path / "no.model"))
    fails("no such directory", load=tmp_path / "nothing-here")
    fails("iteration 12345", "choose --iteration", iteration=12345)
