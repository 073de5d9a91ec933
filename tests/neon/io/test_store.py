"""The `store` and `callable` IO kinds (neon/io/): exact blocked search equals brute force; the
stored encoder equals the documented one; the token context holds only a token and earlier ones;
a malformed entry fails at config time and a bad source before the model is built, naming the
function; a failed call names the function and the call; a store built from the tokenizer fits a
padded vocabulary; a checkpoint's store identity refuses another store unless a swap is asked for."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from neon.config import NeonConfig
from neon.errors import ConfigError, IOFunctionError, IOSourceError
from neon.features import FEATURES
from neon.flaming.io import io_settings, recorded, token_context
from neon.io.base import parse_spec
from neon.io.callables import CallableFunction
from neon.io.encoder import NgramEncoder, describe
from neon.io.index import exact_topk
from neon.io.store import StoreFunction, check_identity, open_store, write_store

V = 32


def small_store(path, docs=None, n=3, key_dim=8, width=2, seed=4):
    docs = docs or [list(range(1, 20)), [5, 9, 2, 7, 7, 1]]
    write_store(str(path), describe(f"random:{seed}", n, key_dim, V), docs, value_width=width)
    return str(path)


def test_blocked_search_equals_brute_force(tmp_path):
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1000, 12, generator=gen).numpy()
    q = torch.randn(37, 12, generator=gen)
    full = torch.topk(q @ torch.from_numpy(keys).T, 5, dim=1)
    for block in (7, 64, 1000, 4096):  # merging across block edges, one block, a block past the end
        s, i = exact_topk(q, keys, 5, block_rows=block)
        assert torch.equal(i, full.indices), block
        assert (s - full.values).abs().max() <= 8 * torch.finfo(torch.float32).eps * full.values.abs().max()


def test_store_layout_keys_and_values(tmp_path):
    path = small_store(tmp_path / "s", docs=[[3, 1, 4, 1, 5]])
    store = open_store(path)
    assert store.entries == 4  # positions with a continuation
    assert store.values.tolist() == [[1, 4], [4, 1], [1, 5], [5, -1]]
    enc = NgramEncoder(store.meta["encoder"])
    assert torch.allclose(torch.from_numpy(np.array(store.keys[2])),
                          enc(torch.tensor([[3, 1, 4]]))[0])  # window ending at position 2
    # documented formula, written again: normalize(sum_j s_j * E[id_j])
    table = torch.randn(V, 8, generator=torch.Generator().manual_seed(4)) / 8 ** 0.5
    signs = torch.randint(0, 2, (3, 8), generator=torch.Generator().manual_seed(5)).float() * 2 - 1
    ref = torch.nn.functional.normalize(signs[1] * table[3] + signs[2] * table[1], dim=0)  # [-1, 3, 1]
    assert torch.allclose(torch.from_numpy(np.array(store.keys[1])), ref, atol=1e-6)
    assert store.identity()["content_sha256"] == store.meta["content_sha256"]


def test_token_context_holds_only_the_token_and_earlier_ones():
    ids = torch.randint(0, V, (3, 9))
    ctx = token_context(ids, 4)  # [s, b, 2 + W]
    later = ids.clone()
    later[:, 5:] = (later[:, 5:] + 1) % V  # change every token after position 4
    ctx2 = token_context(later, 4)
    assert torch.equal(ctx[:5], ctx2[:5]) and not torch.equal(ctx[5:], ctx2[5:])
    for t in range(9):
        for b in range(3):
            want = [-1] * max(0, 3 - t) + ids[b, max(0, t - 3):t + 1].tolist()
            assert ctx[t, b].tolist() == [t, b] + want


def _kwargs(io, **kw):
    return {**dict(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, vocab_size=V,
                   max_position_embeddings=16, flaming_moe="between", flaming_layer_functions=1,
                   flaming_io_functions=io, flaming_io_context_window=4), **kw}


def _config(io, **kw):
    return NeonConfig(**_kwargs(io, **kw))


def test_bad_entries_fail_at_config_and_bad_sources_before_the_model_is_built(tmp_path):
    path = small_store(tmp_path / "s")
    malformed = {
        f"name=facts,kind=stor,source={path}": ["kind='stor'", "'store'"],
        "name=facts,source=x": ["has no kind"],
        "name=x,kind=store,source=y,colour=red": ["'colour'", "store options"],
        "name=x,kind=store,source=y,query=guess": ["query='guess'", "'hidden'"],
        "name=x,kind=store,source=y,topk=0": ["topk=0", ">= 1"],
        "name=train,kind=store,source=y": ["name='train'", "torch.nn.Module", "Fix:"],  # HF's ModuleDict key
        "name=my-store,kind=store,source=y": ["name='my-store'", "letters, digits"],
        "name=x,kind=callable,source=m:f,timeout=soon": ["timeout='soon'", "float"],
    }
    for entry, words in malformed.items():  # config validation: the entry alone, no file opened
        with pytest.raises(ConfigError) as e:
            _config([entry])
        for w in words:
            assert w in str(e.value), (entry, str(e.value))
    bad_sources = {
        f"name=facts,kind=store,source={tmp_path}/missing": ["facts", "missing", "does not exist"],
        "name=api,kind=callable,source=no_such_module_xyz:f": ["api", "no_such_module_xyz", "cannot import"],
        "name=api,kind=callable,source=tests.neon.io_callables:not_a_function": ["api", "not_a_function"],
        "name=api,kind=callable,source=justamodule": ["api", "module:function"],
    }
    for entry, words in bad_sources.items():
        config = _config([entry])  # pure: the config builds
        with pytest.raises(IOSourceError) as e:
            FEATURES["flaming_moe"].prepare(config)  # build_model's first step
        for w in words:
            assert w in str(e.value), (entry, str(e.value))
    with open(os.path.join(path, "values.bin"), "r+b") as f:  # truncate the values
        f.truncate(8)
    with pytest.raises(IOSourceError, match="truncated"):
        FEATURES["flaming_moe"].prepare(_config([f"name=facts,kind=store,source={path}"]))


def _store_function(config, entry):
    FEATURES["flaming_moe"].prepare(NeonConfig(**{**_kwargs([entry]), "vocab_size": config.vocab_size}))
    return StoreFunction(parse_spec(entry), io_settings(config))


def test_store_for_a_larger_vocabulary_or_window_fails_and_a_padded_vocabulary_fits(tmp_path):
    other = tmp_path / "v"
    write_store(str(other), describe("random:1", 3, 8, V + 1), [[1, 2, 3]], value_width=1)
    with pytest.raises(IOSourceError, match="vocabulary of 33 ids, the model has 32"):
        _store_function(_config([]), f"name=facts,kind=store,source={other},topk=1")
    wide = tmp_path / "w"
    write_store(str(wide), describe("random:1", 6, 8, V), [[1, 2, 3]], value_width=1)
    with pytest.raises(IOSourceError, match="flaming_io_context_window >= 6"):
        _store_function(_config([]), f"name=facts,kind=store,source={wide},topk=1")
    # the tokenizer's 32 ids, a model padded to 128: the padded ids never occur, the store fits
    padded = _config([], vocab_size=128)
    fn = _store_function(padded, f"name=facts,kind=store,source={small_store(tmp_path / 'p')},topk=2")
    ctx = token_context(torch.randint(0, V, (1, 5)), 4).view(-1, 6)
    assert fn(torch.zeros(5, 16), ctx).shape == (5, 16)


def test_callable_errors_name_the_function_and_call():
    cfg = _config([])
    ctx = token_context(torch.randint(0, V, (1, 5)), 4).view(-1, 6)
    x = torch.zeros(5, 16)
    settings = io_settings(cfg)
    fn = CallableFunction(parse_spec("name=broken,kind=callable,source=tests.neon.io_callables:raises,width=2"),
                          settings)
    with pytest.raises(IOFunctionError, match=r"'broken'.*call 1.*raised: KeyError.*service unavailable"):
        fn(x, ctx)
    spec = parse_spec("name=shape,kind=callable,source=tests.neon.io_callables:wrong_shape,width=2")
    fn = CallableFunction(spec, settings)
    with pytest.raises(IOFunctionError, match=r"'shape'.*returned shape \(6, 2\), expected \[5, 2\]"):
        fn(x, ctx)


def test_checkpoint_store_identity(tmp_path):
    a = open_store(small_store(tmp_path / "a"))
    b = open_store(small_store(tmp_path / "b", docs=[[1, 2, 3, 4]]))
    check_identity(a.identity(), a)
    with pytest.raises(IOSourceError, match="differs from the checkpoint's store"):
        check_identity(a.identity(), b)
    check_identity(a.identity(), b, swap=True)  # another store attached on purpose
    c = open_store(small_store(tmp_path / "c", key_dim=4))
    with pytest.raises(IOSourceError, match="key_dim 4"):
        check_identity(a.identity(), c, swap=True)
    meta = json.load(open(os.path.join(a.path, "meta.json")))
    assert a.identity()["bytes"] == meta["keys_bytes"] + meta["values_bytes"]


def test_state_dict_records_the_store_and_refuses_another(tmp_path):
    a, b = small_store(tmp_path / "a"), small_store(tmp_path / "b", docs=[[1, 2, 3, 4]])
    spec = "name=facts,kind=store,source={},topk=1"
    settings, Store = io_settings(_config([])), recorded(StoreFunction)  # training's: the identity in its state
    trained = Store(parse_spec(spec.format(a)), settings)
    state = trained.state_dict()
    assert state["_extra_state"]["io_source"]["content_sha256"] == open_store(a).meta["content_sha256"]
    Store(parse_spec(spec.format(a)), settings).load_state_dict(state)  # same store
    with pytest.raises(IOSourceError, match="differs from the checkpoint's store"):
        Store(parse_spec(spec.format(b)), settings).load_state_dict(state)
    swapped = Store(parse_spec(spec.format(b)), io_settings(_config([], flaming_io_store_swap=True)))
    swapped.load_state_dict(state)  # asked for


# --- the learned query ---------------------------------------------------------------------------


def test_learned_keys_are_the_documented_sums_and_take_gradients(tmp_path):
    """key_j = Norm(sum_p E_p[id_{j,p}]) from the store's key ids (-1 adds nothing); the read and
    the contrastive loss move W_q, E and the null key; the teacher is the entry whose frozen key is
    the token's own n-gram code, and recall@k counts it among the retrieved."""
    path = small_store(tmp_path / "s", docs=[[3, 1, 4, 1, 5, 9, 2, 6]])
    store = open_store(path)
    assert store.key_ids[0].tolist() == [-1, -1, 3] and store.key_ids[3].tolist() == [1, 4, 1]
    entry = f"name=m,kind=store,source={path},query=learned,topk=2,null=1"
    fn = _store_function(_config([entry]), entry).train()
    E = fn.key_embedding.weight.view(3, V, -1)  # [n, vocab, K]
    ref = torch.stack([sum(E[p, i] for p, i in enumerate(row) if i >= 0) for row in store.key_ids.tolist()])
    torch.testing.assert_close(fn.learned_keys(), torch.nn.functional.normalize(ref, dim=-1))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    context = token_context(ids, 4)[:, 0]  # [s, b, C] -> [6, 2 + W]
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    out = fn(x, context)
    out.sum().backward()
    for name in ("query_proj.weight", "key_embedding.weight", "null_key", "out_proj.weight"):
        grad = dict(fn.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    teacher = fn.teacher(context)
    assert teacher.tolist() == [0, 1, 2, 3, 4, 5]  # every window of the document is an entry
    report = fn.report()
    assert 0 <= report["flaming_io_m_recall@2"][0] <= report["flaming_io_m_recall@2"][1] == 6
    assert report["flaming_io_m_contrastive_loss"][1] == 1 and fn.report() == {}  # restarts


def test_learned_query_needs_key_ids_and_a_small_store_or_a_reindex(tmp_path, monkeypatch):
    from neon.io import store as store_module

    path = small_store(tmp_path / "s")
    os.remove(os.path.join(path, "key_ids.i32"))  # a store written before key ids were kept
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    del meta["key_ids_bytes"]
    open(os.path.join(path, "meta.json"), "w").write(json.dumps(meta))
    with pytest.raises(IOSourceError, match="query=learned needs the entries' key ids"):
        FEATURES["flaming_moe"].prepare(_config([f"name=m,kind=store,source={path},query=learned"]))
    big = small_store(tmp_path / "big")
    monkeypatch.setattr(store_module, "LEARNED_MAX_ENTRIES", 3)
    with pytest.raises(IOSourceError, match="does up to 3 entries. Fix: reindex=N"):
        FEATURES["flaming_moe"].prepare(_config([f"name=m,kind=store,source={big},query=learned"]))
    FEATURES["flaming_moe"].prepare(_config([f"name=m,kind=store,source={big},query=context"]))  # fine
    FEATURES["flaming_moe"].prepare(_config([f"name=m,kind=store,source={big},query=learned,reindex=5"]))
    for bad in ("query=context,reindex=5", "query=learned,reindex=-1"):
        with pytest.raises(ConfigError, match="re-indexes learned keys"):
            _config([f"name=m,kind=store,source={big},{bad}"])
    monkeypatch.setitem(sys.modules, "faiss", None)  # faiss not installed: its import fails
    with pytest.raises(IOSourceError, match="reindex=5 indexes the learned keys with faiss, which is not installed"):
        FEATURES["flaming_moe"].prepare(_config([f"name=m,kind=store,source={big},query=learned,reindex=5"]))


def test_reindexed_learned_keys_are_searched_in_the_snapshot_until_the_next_reindex(tmp_path):
    """reindex=2: the candidates come from an index of the keys as E was at the last re-index
    (at first, E's initial values), while their scores use the current E; after step 2 the index
    holds the updated keys; the snapshot is in the state dict, and a function loaded from it
    searches as the saved one did. nprobe covers every cell here, so each index search must equal
    the exact top-k over the snapshot's keys."""
    docs = [torch.randint(0, V, (60,), generator=torch.Generator().manual_seed(d)).tolist() for d in range(40)]
    path = small_store(tmp_path / "s", docs=docs)  # 2360 entries: 48 cells of >= 39
    entry = f"name=m,kind=store,source={path},query=learned,topk=4,reindex=2,nprobe=64"
    config = _config([entry])
    fn = _store_function(config, entry).train()
    q = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=-1)

    def top_of(idx, keys):  # True where idx holds the top 4 of q against keys (equal keys tie)
        best = torch.topk(q @ keys.T, 4, dim=1).values
        found = torch.sort((q.unsqueeze(1) * keys[idx]).sum(-1), dim=1, descending=True).values
        return bool(((found - best).abs() <= 1e-5).all())  # unit vectors: float32 rounding is ~1e-7

    initial = fn.learned_keys().detach()
    idx, keys = fn.learned_search(q, None)
    assert top_of(idx, initial)
    with torch.no_grad():  # an optimizer step moves E
        fn.key_embedding.weight.add_(torch.randn_like(fn.key_embedding.weight))
    moved = fn.learned_keys().detach()
    idx, keys = fn.learned_search(q, None)
    assert top_of(idx, initial) and not top_of(idx, moved)  # still the snapshot's candidates
    torch.testing.assert_close(keys, moved[idx], rtol=0, atol=0)  # scored with the current E
    keys.sum().backward()
    assert fn.key_embedding.weight.grad.abs().sum() > 0
    assert fn.after_step(1) is None
    line = fn.after_step(2)
    assert "re-indexed the learned keys of IO function 'm' after step 2: 2360 entries, IVF 48 cells" in line
    assert top_of(fn.learned_search(q, None)[0], moved)

    state = fn.state_dict()
    assert torch.equal(state["indexed_key_embedding"], fn.key_embedding.weight.detach())
    with torch.no_grad():
        fn.key_embedding.weight.add_(torch.randn_like(fn.key_embedding.weight))  # a step after the save
    saved_search = fn.learned_search(q, None)[0]
    torch.manual_seed(123)
    other = _store_function(config, entry)  # other initial values, then the checkpoint
    other.learned_search(q, None)  # an index of its own initial keys, dropped by the load
    other.load_state_dict(fn.state_dict())
    assert torch.equal(other.learned_search(q, None)[0], saved_search)


def test_exclude_skips_the_tokens_own_passage_and_keeps_other_occurrences(tmp_path):
    """A store of the text being trained on, built with passage fingerprints (L = 4): with
    exclude=1 no token retrieves its own position, while the same n-gram elsewhere (another
    passage) is still found, by the function's own search and by the once-per-forward search;
    without passages or with a window shorter than L, exclude=1 is refused. The learned query skips
    the own passage too, in its search and in its teacher."""
    from neon.io.base import context_ids
    from neon.io.store import ContextSearch, own_passage

    doc_a, doc_b = [3, 1, 4, 1, 5, 9, 2, 6], [7, 7, 4, 1, 5, 8]  # the 3-gram 4 1 5 in both, other passages
    path = str(tmp_path / "s")
    write_store(path, describe("random:4", 3, 8, V), [doc_a, doc_b], value_width=1, passage_ids=4)
    store = open_store(path, verify=True)
    assert store.passage_ids == 4 and store.entries == 7 + 5
    own_entry, other_entry = 4, 7 + 4  # position 4 of each document (after 4 1 5)
    assert store.values[own_entry, 0] == 9 and store.values[other_entry, 0] == 8
    entry = f"name=m,kind=store,source={path},query=context,topk=2,exclude=1"
    config = _config([entry])
    fn = _store_function(config, entry)
    ctx = token_context(torch.tensor([doc_a]), 4)[:, 0]  # [8, 2 + W]
    q = fn.encoder(context_ids(ctx, 4))
    plain = store.search(q, 2)
    assert {own_entry, other_entry} == set(plain[4].tolist())  # equal keys: both found without exclude
    assert all(plain[t, 0] == t for t in range(7) if t != 4)  # unique windows: the own entry first
    excluded = store.search(q, 2, own_passage(store, fn.spec.options, ctx, 4))
    assert all(t not in excluded[t].tolist() for t in range(7)), excluded  # never the own position
    assert excluded[4, 0] == other_entry  # the other occurrence still found
    provider = ContextSearch(parse_spec(entry), io_settings(config))
    searched = provider.compute(torch.tensor([doc_a]), ctx.unsqueeze(0), dtype=torch.float32)["m"][0]
    assert torch.equal(searched, excluded)
    assert fn(torch.zeros(8, 16), ctx).shape == (8, 16)
    for reindex in (0, 2):
        learned = f"name=m,kind=store,source={path},query=learned,topk=2,exclude=1,reindex={reindex}"
        fn = _store_function(_config([learned]), learned)
        own = own_passage(store, fn.spec.options, ctx, 4)
        q = fn.learned_keys(torch.arange(7)).detach()  # queries equal to the own entries' keys
        found = fn.learned_search(q, own[:7])[0]
        assert all(t not in found[t].tolist() for t in range(7)), (reindex, found)
        assert fn.teacher(ctx, own)[4] == other_entry and (fn.teacher(ctx, own)[:7] == -1).sum() == 6

    plain_store = small_store(tmp_path / "plain")
    refusals = {f"name=m,kind=store,source={plain_store},exclude=1": ("--passage-ids", {}),
                entry: ("flaming_io_context_window >= 4", {"flaming_io_context_window": 3})}
    for bad, (words, kw) in refusals.items():
        with pytest.raises((IOSourceError, ConfigError), match=words):
            FEATURES["flaming_moe"].prepare(_config([bad], **kw))
