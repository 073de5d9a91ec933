"""tools/convert_to_hf.py with FlamingMoE IO functions: a tiny model whose per-layer bank mixes learned
functions with a store (learned query, null entry), a store (hidden query), a callable and a frozen causal LM
(`model`), and whose global bank holds IO functions only (a store with a context query, searched
once and reused by every layer in megatron, and a callable), trains a few steps (pretrain_neon.py's
training function, torchrun) and is exported through the command line. transformers loads it with
trust_remote_code and computes megatron's logits (each IO function moves them: the check can fail);
greedy generation with and without the KV cache gives the same tokens and logits, the frozen model
reading only the new token through its own cache; bad or changed sources fail at load naming the
function and the source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.neon.test_flaming_moe_io_checkpoint import CALLABLE, build_store
from tests.neon.test_flaming_moe_io_frozen import write_frozen
from tests.tools.conversion_helpers import pretrain_args, run_tool, run_tool_many, train_with_reference

pytestmark = pytest.mark.slow
VOCAB = 512  # the tiny tokenizer's, not padded
TOKENS = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))
IO_NAMES = ("facts", "facts_h", "add", "anchor")
GLOBAL_IO_NAMES = ("gfacts", "gadd")  # bank=global: one function each, shared by the 4 layers
# nGPT: the IO outputs join through the normalized update; 'mlp': the bank replaces the MLP
VARIANTS = {"base": dict(flaming_moe="between"), "ngpt": dict(flaming_moe="between", ngpt=True),
            "mlp": dict(flaming_moe="mlp")}
# megatron and the HF reference compute the same function with other kernels and sum orders; a
# reduction of n terms moves by at most n * 2^-24 of its terms' magnitude (Higham's gamma_n).
# R = 4 layers x (13 reductions of attention, MLP and the FlamingMoE block's two routers and
# combine + 4 of the IO functions: query, scores, weighted read, W_out) + the head, n <= 128 (the
# IO reads' width): R * n * 2^-24 = 5e-4 of the logits' scale in the worst case. The frozen model's states are the same
# transformers call on both sides (bit-identical). A wrong mapping or context moves logits by ~1e-1.
IO_EXPORT_ROUNDING = (4 * 17 + 1) * 128 * 2.0 ** -24
# cached vs uncached generation: the same R, plus the frozen model's own cached vs full pass
# (2 layers x 6 reductions + its norm, n <= 32), carried into W_out relative to its states' scale.
IO_CACHE_ROUNDING = (4 * 17 + 1 + 2 * 6 + 1) * 128 * 2.0 ** -24


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer, tiny_dataset):
    work = tmp_path_factory.mktemp("export_io")
    store = build_store(work / "store", seed=0, vocab=VOCAB)
    frozen = write_frozen(str(work / "frozen"), vocab=VOCAB)
    io = [f"name=facts,kind=store,source={store},query=learned,null=1,topk=2,reindex=1",
          f"name=facts_h,kind=store,source={store},query=hidden,topk=2,temperature=0.5",
          CALLABLE, f"name=anchor,kind=model,source={frozen},layer=1",
          # bank=global: routed for every token of every layer (k = 2 of 2); a one-wide own embedding
          # keeps their reads small next to x' (unit norm under nGPT, where the block's update is
          # normalized), so each per-layer function still moves the logits past twice the bound
          f"name=gfacts,kind=store,source={store},query=context,topk=3,embed_dim=1,bank=global",
          CALLABLE.replace("name=add", "name=gadd") + ",embed_dim=1,bank=global"]
    runs = {}
    for variant, extra in VARIANTS.items():
        args = pretrain_args(work / f"ckpt-{variant}", str(tiny_tokenizer), tiny_dataset[0],
                             flaming_layer_functions=2, flaming_router="topk", flaming_topk=2,
                             flaming_io_context_window=4, init_method_std=0.3, **extra)  # IO terms ~ x'
        runs[variant] = [*args, "--flaming-io-functions", *io]
    reference = train_with_reference(work / "launch", list(runs.values()), TOKENS, nproc=1)
    codes, log = run_tool_many("convert_to_hf", [["--load", work / f"ckpt-{v}", "--save", work / f"hf-{v}", "--quiet"]
                                                 for v in VARIANTS])
    assert codes == [0] * len(VARIANTS), log[-4000:]
    return dict(hf=work / "hf-base", hf_dirs={v: work / f"hf-{v}" for v in VARIANTS},
                reference=dict(zip(VARIANTS, reference)), io=io, store=store, frozen=frozen, work=work)


def load(hf_dir, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32,
                                                **kwargs).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_io_model_matches_megatron(exported, variant):
    hf_dir = exported["hf_dirs"][variant]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["flaming_io_functions"] == exported["io"] and config["flaming_io_context_window"] == 4
    sources = config["flaming_io_sources"]
    assert sources["facts"]["content_sha256"] and sources["anchor"]["sha256"] and sources["add"]["source"]
    assert sources["gfacts"]["content_sha256"] and sources["gadd"]["source"]
    shipped = {"modeling_neon.py", "configuration_neon.py", "base.py", "kinds.py", "errors.py", "store.py", "index.py",
               "encoder.py", "callables.py", "frozen_model.py"}
    assert shipped <= {f.name for f in hf_dir.glob("*.py")}
    model = load(hf_dir)
    want = exported["reference"][variant]
    bound = IO_EXPORT_ROUNDING * max(1.0, want.abs().max().item())
    with torch.no_grad():
        logits = model(TOKENS).logits
        assert want.abs().max() > 0.1
        diff = (logits - want).abs().max().item()
        assert diff <= bound, (diff, bound)
        for name in IO_NAMES + GLOBAL_IO_NAMES:  # each moves the logits past twice the bound: dropping it fails
            weights = ([model.model.flaming_global_io_functions[name].out_proj.weight] if name in GLOBAL_IO_NAMES
                       else [(layer.mlp if variant == "mlp" else layer.flaming).io_functions[name].out_proj.weight
                             for layer in model.model.layers])
            kept = [w.clone() for w in weights]
            for w in weights:
                w.zero_()
            moved = (model(TOKENS).logits - want).abs().max().item()
            for w, k in zip(weights, kept):
                w.copy_(k)
            assert moved > 2 * bound, (name, moved, bound)


def test_generate_with_and_without_cache_agree(exported):
    model = load(exported["hf"])
    frozen = []
    prompt = TOKENS[:, :6]
    with torch.no_grad():
        model(prompt[:, :1])  # loads the frozen model
        [lm] = [p.model for p in model.model.io_providers if getattr(p, "model", None) is not None]  # FrozenModels
        lm.register_forward_pre_hook(lambda m, a, kw: frozen.append(kw["input_ids"].shape[1]), with_kwargs=True)
        runs = {cache: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                      do_sample=False, use_cache=cache, pad_token_id=0, output_logits=True,
                                      return_dict_in_generate=True) for cache in (True, False)}
    cached, uncached = runs[True], runs[False]
    assert cached.sequences.shape == (2, 16) and torch.equal(cached.sequences, uncached.sequences)
    assert len(set(cached.sequences[:, 6:].flatten().tolist())) > 3, "degenerate generation"
    a, b = torch.stack(cached.logits), torch.stack(uncached.logits)
    assert (a - b).abs().max().item() <= IO_CACHE_ROUNDING * max(1.0, b.abs().max().item())
    # the cached run fed its frozen model the prompt, then one new token per step (its own KV
    # cache); the uncached run the whole sequence each step
    assert frozen == [6, *[1] * 9, *range(6, 16)], frozen
    with torch.no_grad():  # beam search reorders the ids window and the frozen cache with the beams
        beams = {cache: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                       num_beams=3, do_sample=False, use_cache=cache, pad_token_id=0)
                 for cache in (True, False)}
    assert torch.equal(beams[True], beams[False])


def _with_io(hf_dir, tmp_path, replace: dict):
    """A copy of the export whose config.json has the IO strings' sources replaced."""
    out = tmp_path / "hf"
    shutil.copytree(hf_dir, out)
    config = json.loads((out / "config.json").read_text())
    for old, new in replace.items():
        config["flaming_io_functions"] = [s.replace(old, new) for s in config["flaming_io_functions"]]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("bad", ["missing_store", "other_store", "unimportable", "missing_model", "retokenize"])
def test_bad_source_at_load_names_it(exported, tmp_path, bad):
    from transformers import AutoConfig

    store, frozen = exported["store"], exported["frozen"]
    other = build_store(tmp_path / "other", seed=1, vocab=VOCAB)
    replace = {"missing_store": {store: str(tmp_path / "nowhere")},
               "other_store": {store: other},
               "unimportable": {"tests.neon.io_callables": "no_such_module"},
               "missing_model": {frozen: str(tmp_path / "no_model")},
               "retokenize": {"layer=1": f"layer=1,tokenizer={other}/meta.json"}}[bad]
    hf_dir = _with_io(exported["hf"], tmp_path, replace)
    expected = {"missing_store": ["'facts'", "does not exist", str(tmp_path / "nowhere")],
                "other_store": ["'facts'", "differs from the", "flaming_io_store_swap=True"],
                "unimportable": ["'add'", "cannot import module 'no_such_module'"],
                "missing_model": ["'anchor'", "not a directory with a config.json"],
                "retokenize": ["'anchor'", "tokenizer"]}[bad]
    with pytest.raises(ValueError) as err:
        load(hf_dir)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))
    if bad == "other_store":  # asked for, another store is attached without retraining
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True, flaming_io_store_swap=True)
        model = load(hf_dir, config=config)
        with torch.no_grad():
            assert model(TOKENS).logits.isfinite().all()


def test_io_export_imports_back_bit_identical(exported, tmp_path):
    """Through both CLIs: the exported IO model imports as a Neon checkpoint (its IO strings and
    window in model.yaml) and exports again with every tensor (W_q, learned keys and their
    indexed snapshot, null key, own embeddings, W_out) unchanged."""
    import yaml

    from tests.tools.test_convert_from_hf import assert_identical, tensors

    hf_dir = exported["hf"]
    done = run_tool("convert_from_hf", "--hf", hf_dir, "--save", tmp_path / "ckpt")
    assert done.returncode == 0, done.stderr[-4000:]
    settings = yaml.safe_load((tmp_path / "ckpt" / "model.yaml").read_text())["model"]
    assert settings["flaming_io_functions"] == exported["io"] and settings["flaming_io_context_window"] == 4
    done = run_tool("convert_to_hf", "--load", tmp_path / "ckpt", "--save", tmp_path / "back", "--quiet")
    assert done.returncode == 0, done.stderr[-4000:]
    before = tensors(hf_dir)
    # 4 layers: facts 6 (W_q, key embedding and its indexed snapshot, null key, value embedding,
    # W_out), facts_h 3, add 2, anchor 1
    assert sum(".io_functions." in k for k in before) == 4 * 12
    assert sum(k.startswith("model.flaming_global_io_functions.") for k in before) == 4  # gfacts 2, gadd 2
    assert_identical(before, tensors(tmp_path / "back"))


def test_io_mapping_splits_the_bank_over_expert_parallel_ranks(exported):
    """At EP=2 the bank [2 learned, facts, facts_h, add, anchor] is 3 + 3 entries per rank (the IO
    functions on both) and the IO-only global bank [gfacts, gadd] 1 + 1: HF -> the two ranks'
    state dicts -> HF gives every tensor back."""
    from neon.config import NeonConfig
    from neon.state_dict_adapter import hf_to_megatron, megatron_to_hf
    from tests.tools.test_convert_from_hf import assert_identical, tensors

    hf = tensors(exported["hf"])
    hf_config = json.loads((exported["hf"] / "config.json").read_text())
    config = NeonConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                        vocab_size=VOCAB, max_position_embeddings=64, flaming_moe="between", flaming_layer_functions=2,
                        flaming_router="topk", flaming_topk=2, flaming_io_functions=hf_config["flaming_io_functions"],
                        flaming_io_context_window=4, expert_model_parallel_size=2)
    ranks = [hf_to_megatron(hf, config, ep_rank=r, ep_size=2) for r in range(2)]
    layer = "decoder.layers.0.flaming_moe.layer_bank.experts.local_experts."
    assert f"{layer}2.value_embedding.weight" in ranks[0] and f"{layer}0.query_proj.weight" in ranks[1]
    assert f"{layer}2.out_proj.weight" in ranks[1] and f"{layer}1.linear.weight" in ranks[0]
    glob = "flaming_global_functions.local_experts.0."  # gfacts on rank 0, gadd on rank 1
    assert f"{glob}value_embedding.weight" in ranks[0] and f"{glob}embedding.weight" in ranks[1]
    assert not any(k.startswith("flaming_global_functions.local_experts.1.") for r in ranks for k in r)
    router = ranks[1]["decoder.layers.3.flaming_moe.global_bank.router.weight"]  # the IO-only bank's router
    assert torch.equal(router, hf["model.layers.3.flaming.global_router.weight"]) and router.shape == (2, 64)
    back = megatron_to_hf([ranks[0]], config, expert_shards=ranks)
    assert_identical(hf, back)


def test_shipped_code_is_the_code_training_runs(exported):
    """Every file next to the exported model is a file of the repository (the IO kinds, errors.py,
    the modeling code) with only its neon imports made relative: the export has no second copy of
    the IO code to drift apart; and code that imports any other part of neon cannot be shipped."""
    from pathlib import Path

    from neon.conversion.hf_dir import self_contained
    from neon.errors import ConversionError

    root = Path(__file__).resolve().parents[2]
    hf_dir = exported["hf"]
    for shipped in sorted(hf_dir.glob("*.py")):
        if shipped.name == "kinds.py":  # written for the kinds this model uses
            assert "register(_kind)" in shipped.read_text()
            continue
        candidates = [root / "neon" / "io" / shipped.name, root / "neon" / "hf" / shipped.name,
                      root / "neon" / shipped.name]
        source = next(p for p in candidates if p.is_file())
        assert shipped.read_text() == self_contained(source.read_text(), source.name), shipped.name
        assert "from neon" not in shipped.read_text() and "import neon" not in shipped.read_text(), shipped.name
    with pytest.raises(ConversionError, match="imports neon.config"):
        self_contained("from neon.config import NeonConfig\n", "bad.py")
