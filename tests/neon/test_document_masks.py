"""Document masks (Megatron-LM's --reset-attention-mask): a token sees no earlier document of its
sample, on every attention path Neon has and in the IO functions' context.

- The attention kernel with `documents` against a float64 reference whose mask is built by loops.
- Whole models (Mistral, sliding window, DiffAttention V1 and V2, nGPT, FlamingMoE with IO
  functions reading the ids window and a frozen model's states): the first document of each
  sample is replaced by other tokens of the same length; the logits of the second document's
  tokens stay the same (within fp32 rounding), those of the first change. Without document ids,
  the second document's logits change too (the check can fail).
- The dataset's document ids: the count of EOD tokens before each token.
"""

import math

import pytest
import torch

from neon.attention import sdpa
from neon.config import NeonConfig
from neon.data.datasets import WithDocuments
from neon.model import build_model
from tests.dist import run_distributed
from tests.neon.test_attention import HEADS, inputs
from tests.neon.test_flaming_moe_io_frozen import write_frozen
from tests.parity import logits_bound

VOCAB, SEQ, BATCH, FIRST = 32, 12, 2, 5  # the first document: tokens 0..4 (its EOD at 4)
EOD = VOCAB - 1


def reference(q, k, v, scale, window, documents):
    """float64 softmax(q k^T scale + mask) v; query i sees keys j <= i of its own document
    (and within `window`)."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    b, s = documents.shape
    allowed = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for n in range(b):
        for i in range(s):
            for j in range(i + 1):
                in_window = window is None or j > i - window
                allowed[n, 0, i, j] = in_window and bool(documents[n, i] == documents[n, j])
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window", [None, 3])
def test_attention_within_documents_matches_reference(heads, window):
    d, s = 16, 20
    q, k, v = inputs(2, *heads, s, d)
    documents = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [0] * 20])
    out = sdpa(q, k, v, scale=1 / math.sqrt(d), window=window, documents=documents)
    expected = reference(q, k, v, 1 / math.sqrt(d), window, documents)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)  # fp32, <= 20 terms of order one
    plain = sdpa(q, k, v, scale=1 / math.sqrt(d), window=window)
    assert not torch.allclose(plain[0], out[0], atol=1e-3)  # the first row has three documents


def test_dataset_document_ids_count_the_eods_before_each_token():
    tokens = torch.tensor([5, 6, EOD, 7, EOD, EOD, 8, 9])
    ds = WithDocuments([{"tokens": tokens}], EOD)
    assert ds[0]["documents"].tolist() == [0, 0, 0, 1, 1, 2, 3, 3]


# --- whole models ----------------------------------------------------------------------------------

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
            vocab_size=VOCAB, max_position_embeddings=32, pipeline_dtype=torch.float32)
VARIANTS = {
    "mistral": {},
    "window": dict(sliding_window=4),
    "diff-v1": dict(diff_attention="matched"),
    "diff-v2": dict(diff_attention="v2"),
    "ngpt": dict(ngpt=True),
    "io": dict(flaming_moe="between", flaming_layer_functions=1, flaming_router="topk", flaming_topk=2,
               flaming_io_context_window=4,
               flaming_io_functions=["name=add,kind=callable,source=tests.neon.io_callables:window_sum,width=1"]),
    "io-frozen": dict(flaming_moe="between", flaming_layer_functions=1, flaming_router="topk", flaming_topk=2,
                      flaming_io_context_window=4, flaming_io_functions=["name=anchor,kind=model,source={frozen},"
                                                                        "layer=1"]),
}


def samples(seed: int):
    """[b, s] tokens whose first document (tokens 0..FIRST-1, EOD last) is drawn from `seed`, the
    rest fixed; and their document ids."""
    rest = torch.randint(0, EOD, (BATCH, SEQ - FIRST), generator=torch.Generator().manual_seed(99))
    first = torch.randint(0, EOD, (BATCH, FIRST), generator=torch.Generator().manual_seed(seed))
    first[:, -1] = EOD
    tokens = torch.cat([first, rest], dim=1)
    ends = (tokens == EOD).long()
    return tokens, torch.cumsum(ends, 1) - ends


def document_logits(settings: dict):
    """Logits of two sample batches differing only in their first documents, with and without
    document ids: {"masked": (a, b), "unmasked": (a, b)}."""
    torch.manual_seed(0)
    cfg = NeonConfig(**BASE, **settings)
    model = build_model(cfg).eval()
    with torch.no_grad():  # IO functions start small (init_std); made loud, what they read shows in the logits
        for name, p in model.named_parameters():
            if "out_proj" in name:
                p.mul_(100)
    out = {}
    with torch.no_grad():
        for name, with_docs in (("masked", True), ("unmasked", False)):
            logits = []
            for seed in (1, 2):
                tokens, documents = samples(seed)
                positions = torch.arange(SEQ).expand(BATCH, SEQ)
                logits.append(model(tokens, positions, documents if with_docs else None))  # [b, s, vocab]
            out[name] = tuple(logits)
    out["bound"] = logits_bound(cfg, SEQ, max(float(out["masked"][0].abs().max()), 1.0))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_earlier_document_does_not_change_a_tokens_logits(variant, tmp_path):
    settings = dict(VARIANTS[variant])
    if "flaming_io_functions" in settings:
        frozen = write_frozen(str(tmp_path / "frozen"), vocab=VOCAB)
        settings["flaming_io_functions"] = [f.format(frozen=frozen) for f in settings["flaming_io_functions"]]
    [res] = run_distributed(document_logits, 1, kwargs={"settings": settings})
    (a, b), (ua, ub) = res["masked"], res["unmasked"]
    bound = res["bound"]
    later = slice(FIRST, SEQ)
    assert (a[:, later] - b[:, later]).abs().max() <= bound, "the second document saw the first"
    assert (a[:, :FIRST] - b[:, :FIRST]).abs().max() > 100 * bound  # the first document's own tokens differ
    assert (ua[:, later] - ub[:, later]).abs().max() > 100 * bound  # without document ids the first is seen
