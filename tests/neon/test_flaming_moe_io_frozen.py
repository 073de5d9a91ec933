"""FlamingMoE IO kind `model` (neon/io/frozen_model.py): a frozen `transformers` causal LM,
saved locally, as a routed function.

- Parity: a bank [learned linear, model function] against a dense plain-PyTorch reference (every
  function on every token, weighted by the same routing) whose frozen states come from calling
  the `transformers` model directly; outputs and gradients agree in fp32 at EP=1 and EP=2 with
  both dispatchers, in real gloo processes.
- Frozen: its weights are bit-identical after Adam steps, never in the optimizer or the state
  dict, no .grad, and no backward hook of any of its modules ever fires (the same hooks do fire
  when the model is run with gradients: the check can fail).
- Identity, bad input, re-tokenization between two real sentencepiece vocabularies.
"""

import os

import pytest
import torch
from megatron.core import parallel_state

from neon.config import NeonConfig
from neon.errors import IOSourceError
from neon.features import FEATURES
from neon.flaming.block import FlamingMoE
from neon.flaming.io import io_settings, io_specs, model_context, recorded, token_context
from neon.io.base import parse_spec
from neon.io.frozen_model import FrozenModels, ModelFunction, Retokenizer, pack_states, unpack_states
from tests.dist import run_distributed

D, SEQ, BATCH, V, W, H, LAYER = 16, 6, 2, 32, 4, 24, 1
EPS32 = torch.finfo(torch.float32).eps


def write_frozen(path: str, seed: int = 0, vocab: int = V, hidden: int = H) -> str:
    """A tiny MistralForCausalLM saved with save_pretrained (nothing downloaded)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    MistralForCausalLM(cfg).save_pretrained(path)
    return path


def config(frozen: str, dispatcher: str = "alltoall", ep: int = 1, extra: str = "", vocab: int = V) -> NeonConfig:
    return NeonConfig(num_layers=2, hidden_size=D, num_attention_heads=2, ffn_hidden_size=24, vocab_size=vocab,
                      max_position_embeddings=16, flaming_moe="between", flaming_layer_functions=1,
                      flaming_io_functions=[f"name=anchor,kind=model,source={frozen},layer={LAYER}{extra}"],
                      flaming_io_context_window=W, flaming_router="topk", flaming_topk=2,
                      flaming_token_dispatcher=dispatcher, expert_model_parallel_size=ep,
                      pipeline_dtype=torch.float32)


# --- parity against a plain-PyTorch reference ----------------------------------------------------


def reference_states(frozen: str, ids: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [s * b, H] in megatron's token order, straight from transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(frozen, local_files_only=True)
    with torch.no_grad():
        h = hf(input_ids=ids, output_hidden_states=True).hidden_states[LAYER]  # [b, s, H]
    return h.transpose(0, 1).reshape(-1, H)


def _case(frozen: str, dispatcher: str) -> dict:
    ep = parallel_state.get_expert_model_parallel_world_size()
    rank = parallel_state.get_expert_model_parallel_rank()
    gen = torch.Generator().manual_seed(5)
    w_router, w_lin, w_out = (torch.randn(2, D, generator=gen), torch.randn(D, D, generator=gen) * 0.3,
                              torch.randn(D, H, generator=gen) * 0.3)
    xs = [torch.randn(SEQ, BATCH, D, generator=gen) for _ in range(ep)]
    ids = [torch.randint(0, V, (BATCH, SEQ), generator=gen) for _ in range(ep)]
    rs = [torch.randn(SEQ, BATCH, D, generator=gen) for _ in range(ep)]

    cfg = config(frozen, dispatcher, ep)
    block = FlamingMoE(cfg, layer_number=1)
    bank = block.layer_bank
    first = bank.experts.first_function
    with torch.no_grad():
        bank.router.weight.copy_(w_router)
        for i, expert in enumerate(bank.experts.local_experts):
            if first + i == 0:
                expert.linear.weight.copy_(w_lin)
            else:
                expert.out_proj.weight.copy_(w_out)
    ctx = model_context(cfg, ids[rank])
    x = xs[rank].clone().requires_grad_(True)
    out, _ = block(x, context=ctx)
    (out * rs[rank]).sum().backward()

    ref = [t.clone().requires_grad_(True) for t in (w_router, w_lin, w_out)]
    for r in range(ep):
        xr = xs[r].clone().requires_grad_(True)
        xt, hr = xr.view(-1, D), reference_states(frozen, ids[r])
        wr = ref[0] if r == rank else ref[0].detach()
        p = torch.softmax(xt @ wr.T, dim=-1)  # top-2 of 2: both functions, weights p
        o = xt + p[:, :1] * (xt @ ref[1].T) + p[:, 1:] * (hr @ ref[2].T)
        (o.view_as(xr) * rs[r]).sum().backward()
        if r == rank:
            ref_out, ref_dx = o.view_as(xr).detach(), xr.grad
    grads = {"router": (bank.router.weight.grad, ref[0].grad)}
    for i, expert in enumerate(bank.experts.local_experts):
        g = first + i
        mine = expert.linear.weight.grad if g == 0 else expert.out_proj.weight.grad
        grads[f"f{g}"] = (mine, ref[1 + g].grad)
    return dict(out=(out.detach(), ref_out), dx=(x.grad, ref_dx), grads=grads, usage=bank.usage.tolist())


def check_parity(frozen: str):
    return {d: _case(frozen, d) for d in ("alltoall", "allgather")}


def bound(ref: torch.Tensor) -> float:
    """fp32, different summation orders (d=16 / H=24 inner products, 2 functions): <= 64 roundings
    of eps times the largest entry (the frozen states are the same bits on both sides)."""
    return 64 * EPS32 * max(1.0, ref.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2], ids=["ep1", "ep2"])
def test_model_function_matches_dense_reference(ep, tmp_path):
    frozen = write_frozen(str(tmp_path / "frozen"))
    for results in run_distributed(check_parity, ep, ep=ep, kwargs={"frozen": frozen}, timeout=300):
        for dispatcher, r in results.items():
            for key in ("out", "dx"):
                got, ref = r[key]
                assert (got - ref).abs().max().item() <= bound(ref), (dispatcher, key)
            for key, (got, ref) in r["grads"].items():
                assert ref.abs().max() > 1e-3, (dispatcher, key, "degenerate reference gradient")
                assert (got - ref).abs().max().item() <= bound(ref), (dispatcher, key)
            assert min(r["usage"]) > 0, (dispatcher, r["usage"])


# --- the frozen model stays frozen ---------------------------------------------------------------


def _hooks(module: torch.nn.Module, fired: list) -> list:
    return [m.register_full_backward_pre_hook(lambda *_: fired.append(1)) for m in module.modules()
            if any(True for _ in m.parameters(recurse=False))]


def check_frozen(frozen: str) -> dict:
    from neon.model import build_model

    cfg = config(frozen)
    model = build_model(cfg)
    (fm,) = [p for p in model.io_providers if isinstance(p, FrozenModels)]
    fm.load(torch.device("cpu"), torch.float32)  # as the first forward does
    before = {k: v.clone() for k, v in fm.model.state_dict().items()}
    fired: list = []
    handles = _hooks(fm.model, fired)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    out_before = None
    for _ in range(3):
        ids = torch.randint(0, V, (BATCH, SEQ + 1), generator=gen)
        loss = model(ids[:, :-1], torch.arange(SEQ).expand(BATCH, SEQ), None, labels=ids[:, 1:]).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        w = model.decoder.layers[0].flaming_moe.layer_bank.experts.local_experts[1].out_proj.weight
        out_before = w.detach().clone() if out_before is None else out_before
    trained_proj = not torch.equal(out_before, w.detach())
    report = [fm.report(1.0) for _ in range(2)]  # the second: count restarted
    hooks_in_training = len(fired)
    # positive control: the same hooks fire when the model runs with gradients
    fm.model.requires_grad_(True)
    fm.model(input_ids=ids).logits.sum().backward()
    control = len(fired) - hooks_in_training
    for h in handles:
        h.remove()
    frozen_ids = {id(p) for p in fm.model.parameters()}
    return dict(
        identical=all(torch.equal(before[k], v) for k, v in fm.model.state_dict().items()),
        report=report, weights_gb=sum(p.numel() * 4 for p in fm.model.parameters()) / 1e9,
        trained_proj=trained_proj, hooks=hooks_in_training, control=control, calls=fm.calls,
        in_optimizer=any(id(p) in frozen_ids for g in opt.param_groups for p in g["params"]),
        in_state=[k for k in model.state_dict() if "embed_tokens" in k or "self_attn.q_proj" in k],
        recorded=[v for k, v in model.state_dict().items() if k.endswith("local_experts.1._extra_state")])


def test_frozen_model_is_never_trained(tmp_path):
    frozen = write_frozen(str(tmp_path / "frozen"))
    (r,) = run_distributed(check_frozen, 1, kwargs={"frozen": frozen}, timeout=300)
    assert r["trained_proj"], "the projection did not train: the check would prove nothing"
    assert r["identical"], "the frozen model's weights changed"
    assert r["hooks"] == 0, "a backward pass ran through the frozen model"
    assert r["control"] > 0, "the backward hooks never fire: the check cannot fail"
    assert r["calls"] == 3, "the frozen model must run once per micro-batch (3 steps x 1)"
    assert not r["in_optimizer"] and not r["in_state"]
    first, second = r["report"]
    assert 0 < first["frozen_model_time_share"] and second["frozen_model_time_share"] == 0
    assert first["frozen_model_memory_gb"] == r["weights_gb"]
    assert len(r["recorded"]) == 2  # one per layer
    rec = r["recorded"][0]
    assert rec["io_source"]["path"] == os.path.abspath(frozen) and len(rec["io_source"]["sha256"]) == 64


def test_frozen_model_is_loaded_without_grad(tmp_path):
    frozen = write_frozen(str(tmp_path / "f"))
    fm = FrozenModels([parse_spec(f"name=a,kind=model,source={frozen}")], io_settings(config(frozen)))
    ids = torch.randint(0, V, (2, 5))
    cols = fm.compute(ids, token_context(ids, W).transpose(0, 1), dtype=torch.float32)["a"]
    assert not any(p.requires_grad for p in fm.model.parameters()) and not fm.model.training
    assert cols.grad_fn is None and cols.dtype == torch.int64


def test_states_pack_bit_exactly():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(7, 3, 13).to(dtype)
        assert torch.equal(unpack_states(pack_states(x), 13).to(dtype), x), dtype


# --- identity and bad input ------------------------------------------------------------------------


def test_changed_model_at_resume_is_refused(tmp_path):
    a, b = write_frozen(str(tmp_path / "a"), seed=0), write_frozen(str(tmp_path / "b"), seed=1)

    def fn(path, **kw):
        cfg = config(path)
        for k, v in kw.items():
            setattr(cfg, k, v)
        return recorded(ModelFunction)(parse_spec(f"name=anchor,kind=model,source={path},layer={LAYER}"),
                                       io_settings(cfg))

    state = fn(a).state_dict()
    fn(a).load_state_dict(state)  # the same model
    with pytest.raises(IOSourceError, match="trained with the frozen model"):
        fn(b).load_state_dict(state)
    fn(b, flaming_io_store_swap=True).load_state_dict(state)  # a swap, asked for (same hidden size)
    wider = write_frozen(str(tmp_path / "wider"), hidden=32)  # the projection no longer fits
    with pytest.raises(IOSourceError, match="trained with the frozen model"):
        fn(wider, flaming_io_store_swap=True).load_state_dict(state)


def test_bad_model_sources_fail_before_the_model_is_built(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(str(tmp_path / "bert"))
    good = write_frozen(str(tmp_path / "good"))
    cases = [(str(tmp_path / "missing"), "", V, "not a directory with a config.json"),
             (str(tmp_path / "bert"), "", V, "not a causal LM"),
             (good, "", 64, "vocab_size 64 exceeds"),
             (good, f",tokenizer={tmp_path / 'none.model'}", V, "does not exist")]
    prepare = FEATURES["flaming_moe"].prepare  # build_model's first step (the config itself opens nothing)
    for path, extra, vocab, message in cases:
        with pytest.raises(IOSourceError, match=message) as e:
            prepare(config(path, extra=extra, vocab=vocab))
        assert "Fix:" in str(e.value)
    with pytest.raises(IOSourceError, match="layer=7 is outside"):
        prepare(NeonConfig(num_layers=2, hidden_size=D, num_attention_heads=2, vocab_size=V, flaming_moe="between",
                           flaming_io_functions=[f"name=a,kind=model,source={good},layer=7"]))


# --- re-tokenization between two vocabularies ---------------------------------------------------------


TEXT = ("the quick brown fox jumps over the lazy dog while the small cat sleeps under the warm sun "
        "and the farmer counts seven green apples near the old wooden barn beside the river bank")


def train_spm(path, vocab: int) -> str:
    import sentencepiece as spm

    (path.parent / "text.txt").write_text("\n".join([TEXT, TEXT.upper(), TEXT[::-1]] * 20))
    spm.SentencePieceTrainer.train(input=str(path.parent / "text.txt"), model_prefix=str(path), vocab_size=vocab,
                                   model_type="bpe", bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
                                   num_threads=1, minloglevel=2)
    return f"{path}.model"


def test_retokenization_gives_the_last_frozen_token_ending_by_t(tmp_path):
    import shutil

    import sentencepiece as spm

    neon_tok, frozen_tok = train_spm(tmp_path / "neon", 100), train_spm(tmp_path / "frozen_tok", 160)
    neon, other = spm.SentencePieceProcessor(model_file=neon_tok), spm.SentencePieceProcessor(model_file=frozen_tok)
    assert neon.get_piece_size() != other.get_piece_size()
    frozen = write_frozen(str(tmp_path / "frozen"), vocab=other.get_piece_size())
    shutil.copy(frozen_tok, os.path.join(frozen, "tokenizer.model"))
    ids = neon.encode("the farmer counts seven green apples")
    frozen_ids, src = Retokenizer(neon_tok, os.path.join(frozen, "tokenizer.model")).align(ids)
    assert frozen_ids == other.encode("the farmer counts seven green apples")
    # independent check with decoded text lengths: frozen token src[t] ends by the end of t,
    # frozen token src[t] + 1 ends after it
    neon_end = [len(neon.decode(ids[:t + 1])) for t in range(len(ids))]
    frozen_end = [len(other.decode(frozen_ids[:j + 1])) for j in range(len(frozen_ids))]
    for t, j in enumerate(src):
        assert j == -1 or frozen_end[j] <= neon_end[t], (t, j)
        assert j + 1 == len(frozen_ids) or frozen_end[j + 1] > neon_end[t], (t, j)
    assert len(set(src)) > 3 and src != list(range(len(ids))), "the test text does not exercise the mapping"

    # the states the function reads: the frozen model's own state at frozen token src[t]
    cfg = config(frozen, extra=f",tokenizer={neon_tok}", vocab=neon.get_piece_size())
    fm = FrozenModels(io_specs(cfg), io_settings(cfg))
    batch = torch.tensor([ids])
    got = unpack_states(fm.compute(batch, token_context(batch, W), dtype=torch.float32)["anchor"][0], H)  # [s, H]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(frozen, local_files_only=True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([frozen_ids]), output_hidden_states=True).hidden_states[LAYER][0]
    for t, j in enumerate(src):
        want = ref[j] if j >= 0 else torch.zeros(H)
        assert torch.allclose(got[t], want, atol=64 * EPS32 * max(1.0, ref.abs().max().item())), t


# --- through megatron's schedules: recompute, the pipeline, tensor parallelism -------------------


def layout_init(model) -> None:
    """deterministic_init's weights in any layout: each parameter drawn at its full (TP=1) shape
    from a seed of its global name (layer numbers counted over all stages), then cut as megatron
    splits it over TP (along partition_dim; SwiGLU's linear_fc1 is [gate; up] on every rank);
    FlamingMoE's functions are whole on every TP rank."""
    import re
    import zlib

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    offset = model.decoder.layers[0].layer_number - 1
    for name, p in model.named_parameters():
        name = re.sub(r"decoder\.layers\.(\d+)", lambda m: f"decoder.layers.{offset + int(m[1])}", name)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        # megatron marks the functions' weights tensor_model_parallel too: their TP group is of size 1
        split = tp > 1 and getattr(p, "tensor_model_parallel", False) and "flaming_" not in name
        shape = [n * tp if split and d == p.partition_dim else n for d, n in enumerate(p.shape)]
        full = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.2
        if split:
            parts = full.chunk(2, p.partition_dim) if name.endswith("linear_fc1.weight") else (full,)
            full = torch.cat([part.chunk(tp, p.partition_dim)[rank] for part in parts], p.partition_dim)
        with torch.no_grad():
            p.copy_(full)


def train_with_model_function(frozen: str, recompute: bool) -> dict:
    from neon.model import build_model
    from neon.training.step import build_model_chunks
    from tests.neon.test_flaming_moe_io_model import MB, MICROBATCHES, STEPS, batches
    from tests.train_helpers import sgd_losses

    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:  # the functions are not split by TP; each TP rank routes its part of the sequence
        extra.update(tensor_model_parallel_size=tp, sequence_parallel=True, expert_tensor_parallel_size=1)
    cfg = NeonConfig(num_layers=2, hidden_size=D, num_attention_heads=2, ffn_hidden_size=24, vocab_size=V,
                     max_position_embeddings=16, flaming_moe="between", flaming_layer_functions=1,
                     flaming_router="topk", flaming_topk=2, flaming_io_context_window=W,
                     flaming_io_functions=[f"name=anchor,kind=model,source={frozen},layer={LAYER}"],
                     pipeline_dtype=torch.float32,
                     pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(), **extra)
    chunks = build_model_chunks(cfg, build_model)
    layout_init(chunks[0].module)
    losses, norms = sgd_losses(chunks, cfg, batches(STEPS * MICROBATCHES), steps=STEPS, num_microbatches=MICROBATCHES,
                               seq_length=8, micro_batch_size=MB)
    (fm,) = [p for m in chunks[0].modules() for p in (getattr(m, "io_providers", None) or ())
             if isinstance(p, FrozenModels)]
    last = parallel_state.is_pipeline_last_stage()
    return dict(losses=losses if last else None, norms=norms, calls=fm.calls, expected_calls=STEPS * MICROBATCHES)


def check_schedules(frozen: str, recompute: tuple = (False, True)):
    return {rc: train_with_model_function(frozen, rc) for rc in recompute}


@pytest.mark.slow
def test_model_function_under_recompute_pipeline_and_tensor_parallel(tmp_path):
    """PP=1 (with and without full recompute), PP=2 (both) and TP=2 with sequence parallelism (the
    frozen model replicated on both TP ranks, each routing its half of the sequence; the bank's
    functions not split): the same losses and gradient norms."""
    frozen = write_frozen(str(tmp_path / "frozen"))
    (pp1,) = run_distributed(check_schedules, 1, kwargs={"frozen": frozen}, timeout=300)
    pp2 = run_distributed(check_schedules, 2, pp=2, kwargs={"frozen": frozen}, timeout=300)
    tp2 = run_distributed(check_schedules, 2, tp=2, etp=1, kwargs={"frozen": frozen, "recompute": (False,)},
                          timeout=300)
    ref = pp1[False]
    assert ref["losses"][-1] < ref["losses"][0], "training did not lower the loss"
    # fp32, the runs differ only in the order of sums (as in test_flaming_moe_io_model.py; at TP=2
    # also the row-parallel partial sums and the vocab-parallel softmax's two halves)
    tol = 64 * EPS32 * max(ref["losses"])
    runs = [("pp1 recompute", pp1[True]), ("pp2", pp2[1][False]), ("pp2 recompute", pp2[1][True]),
            *((f"tp2 rank {r}", tp2[r][False]) for r in range(2))]
    for name, run in runs:
        assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) <= tol, (name, run["losses"])
        assert max(abs(a - b) / b for a, b in zip(run["norms"], ref["norms"])) <= 64 * EPS32, (name, run["norms"])
    for run in [*pp1.values(), *(r for stage in [*pp2, *tp2] for r in stage.values())]:
        assert run["calls"] == run["expected_calls"], "the frozen model must run once per micro-batch and rank"
