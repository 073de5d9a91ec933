"""FlamingMoE IO functions in the HF reference (neon/io/, run by neon/hf/modeling_neon.py): the
context rows a callable receives are Neon's (neon.flaming.io.token_context, sequence = batch row) in a full forward, in
cached decoding (the ids before the new token come from the cache's IO state) and with left
padding (padded positions read -1); a `bank=global` function is one module of the model that every
layer's global bank routes to."""

import torch

from neon.flaming.io import token_context
from neon.hf.configuration_neon import NeonHFConfig
from neon.hf.modeling_neon import NeonForCausalLM
from tests.neon import io_callables

W = 4


def io_model(bank: str = "layer", layers: int = 1) -> NeonForCausalLM:
    """One IO function alone in its bank: every token is routed to it."""
    torch.manual_seed(0)
    cfg = NeonHFConfig(vocab_size=io_callables.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                       flaming_moe="between", flaming_router="topk", flaming_topk=1, flaming_io_context_window=W,
                       flaming_io_functions=["name=add,kind=callable,source=tests.neon.io_callables:recording_sum,"
                                             f"width=2,bank={bank}"],
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return NeonForCausalLM(cfg).eval()


def rows(batches) -> list:
    return sorted(tuple(r) for b in batches for r in b.tolist())


def test_context_rows_are_neons_full_and_cached():
    model = io_model()
    ids = torch.randint(0, io_callables.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    want = rows([token_context(ids, W).reshape(-1, 2 + W)])  # Neon's rows: [s, b, 2 + W]
    io_callables.RECORDED.clear()
    with torch.no_grad():
        model(ids)
        assert rows(io_callables.RECORDED) == want
        io_callables.RECORDED.clear()
        out = model(ids[:, :3], use_cache=True)
        for t in range(3, 9):  # one token at a time: its window reaches back into the cache
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
    assert rows(io_callables.RECORDED) == want


def test_padding_reads_as_minus_one():
    model = io_model()
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    io_callables.RECORDED.clear()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    row1 = sorted(r for r in rows(io_callables.RECORDED) if r[1] == 1)
    assert row1[-1] == (3, 1, -1, -1, 9, 10) and all(r[2:4] == (-1, -1) for r in row1)


def test_global_io_function_is_one_module_every_layer_routes_to():
    model = io_model(bank="global", layers=2)
    names = [k for k in model.state_dict() if ".add." in k]
    assert names == ["model.flaming_global_io_functions.add.embedding.weight",
                     "model.flaming_global_io_functions.add.out_proj.weight"], names
    for layer in model.model.layers:  # an IO-only global bank: its router, no per-layer bank
        assert layer.flaming.global_router.weight.shape == (1, 16) and layer.flaming.layer_router is None
    ids = torch.randint(0, io_callables.VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    io_callables.RECORDED.clear()
    with torch.no_grad():
        base = model(ids).logits
        assert rows(io_callables.RECORDED) == rows([token_context(ids, W).reshape(-1, 2 + W)] * 2)  # per layer
        model.model.flaming_global_io_functions["add"].out_proj.weight.zero_()
        assert not torch.allclose(model(ids).logits, base)  # its output reaches the logits
