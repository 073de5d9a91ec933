"""NeonForCausalLM: the plain single-process PyTorch reference of the Neon architecture.

Written straight from the equations (Mistral; DiffAttention, Ye et al. 2024, arXiv 2410.05258,
and its V2, Ye, Dong, Sun and Wei 2026),
independently of the megatron implementation in neon/, which is tested against it. With every
Neon feature off it computes what transformers' MistralForCausalLM computes, with the same
parameter names. This file and configuration_neon.py are copied next to a saved model with the IO
kinds it uses (neon/io/, the same code training runs, and neon/errors.py), so it imports nothing
from the neon package but those, and the export makes those imports relative.

Shapes: b batch, s new tokens, t cached + new tokens, D hidden size, n heads, g key/value heads,
d query/key width per head (per half under DiffAttention), d_v value/output width per head.

DiffAttention (per differential head, Q = [Q1; Q2], K = [K1; K2] along the head's rows):
    A_i    = softmax(Q_i K_i^T / sqrt(d) + mask),  i = 1, 2      (RoPE on each half, true positions)
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,  lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))
    head   = (1 - lambda_init) * RMSNorm_{d_v}((A_1 - lambda A_2) V)
Layouts: 'matched' n = H/2, g = H_kv/2, d_v = 2d (Mistral's parameter shapes);
         'expressive' n = H, g = H_kv, Q and K doubled, d_v = d.

DiffAttention V2 ('v2'; n = H output heads over g = H_kv key/value heads, all of width d):
    O_j    = softmax(Q_j K^T / sqrt(d) + mask) V  for the 2n query heads j (head j reads key head
             j // (2n / g): the pair 2h, 2h + 1 shares one key/value head)
    head_h = O_2h - sigmoid(W_lambda x)_h O_2h+1     (no per-head norm, no lambda_init)

FlamingMoE (Neon's own; x' the block's normalized input, per token and per bank B of n functions):
    logits = W_B x'                                   (each layer has its own router per bank)
    'gumbel': chosen = top-k(logits + g) in training (g ~ Gumbel(0, 1)), top-k(logits) in
              evaluation (deterministic); weight 1 forward, softmax((logits + g) / tau) backward
    'topk':   p = softmax(logits); chosen = top-k(p), weight p
    r = x' + sum_B sum_{i chosen} weight_i f_i(x')    ('between': h <- h + r; 'mlp': r replaces the MLP)
The global bank's functions belong to the model and serve every layer; each layer owns its own bank.
IO functions (neon/io/, flaming_io_functions) join a bank after its learned ones: `bank=layer`
the per-layer bank (router outputs F, F + 1, ...), `bank=global` the global bank (router outputs
G, G + 1, ...; the functions belong to the model like the global learned ones) and also read each routed token's context
    c_t = (position_t, batch row, id_{t-W+1} .. id_t)     (W = flaming_io_context_window, -1 before the start)
    g(x'_t, c_t) = W_out read(q(x'_t, c_t), c_t)          (store top-k read, a callable, a frozen LM's state)
The context (and the IO kinds' own columns: a frozen model's states, a search every layer would
repeat) is built once per forward (`NeonModel.io_inputs`); under generation the last W - 1 ids and
each frozen model's KV cache are kept on the cache.

nGPT (Loshchilov et al. 2024, arXiv 2410.01131), Norm(x) = x / ||x||_2, no RMSNorm layers:
    h <- Norm(h + |alpha_A| (Norm(ATTN(h)) - h)),  h <- Norm(h + |alpha_M| (Norm(MLP(h)) - h))
    q, k <- Norm(q) s_qk, Norm(k) s_qk per head after RoPE; softmax scale sqrt(d)
    MLP: u <- u s_u, v <- v s_v sqrt(D), down(u * SiLU(v));  logits z <- z s_z
Each scaling vector is stored at `scale` and used as stored * init / scale (ngpt_scaling).
`NeonForCausalLM.normalize_ngpt_weights()` puts every weight vector in D-space back on the unit
sphere (rows of q/k/v/gate/up/embeddings/lm_head, columns of o/down): call it after every
optimizer step when training this reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from neon.io.base import (
    ContextLayout,
    IOCacheState,
    IOSettings,
    build_context,
    context_providers,
    io_specs,
    kind_of,
)
from neon.io.kinds import KINDS  # noqa: F401  (registers the IO kinds)

from .configuration_neon import NeonHFConfig


def io_settings(config: NeonHFConfig) -> IOSettings:
    return IOSettings(hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                      context_window=config.flaming_io_context_window, init_std=config.initializer_range,
                      source_swap=config.flaming_io_store_swap, reuse_search=config.flaming_io_reuse_search)


def build_io_function(config: NeonHFConfig, spec):
    """The IO function of `spec`; with the sources recorded at export (flaming_io_sources), its
    source must be the recorded one unless flaming_io_store_swap (then of the same shape)."""
    settings = io_settings(config)
    kind = kind_of(spec.kind)
    kind.check_source(spec, settings)
    fn = kind.build(spec, settings)
    recorded = (config.flaming_io_sources or {}).get(spec.name)
    if recorded:
        fn.check_source(recorded)
    return fn


def ngpt_scaling(config) -> dict:
    """name -> (init, scale) of nGPT's scaling vectors; alpha and s_z at 1/sqrt(D) or 1/D
    (config.ngpt_alpha_sz_scale 'inv_sqrt_d' / 'inv_d')."""
    base = config.hidden_size ** -0.5
    moved = 1.0 / config.hidden_size if config.ngpt_alpha_sz_scale == "inv_d" else base
    return {"alpha": (0.05, moved), "s_qk": (1.0, base), "s_u": (1.0, 1.0), "s_v": (1.0, 1.0), "s_z": (1.0, moved)}


def ngpt_vector(config, name: str, size: int) -> nn.Parameter:
    return nn.Parameter(torch.full((size,), ngpt_scaling(config)[name][1]))


def ngpt_effective(config, name: str, stored: torch.Tensor) -> torch.Tensor:
    init, scale = ngpt_scaling(config)[name]
    return stored * (init / scale)


def unit_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Norm(x) = x / ||x||_2 along dim."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True)


def lambda_init_for_layer(layer: int, constant: float | None = None) -> float:
    """lambda_init for the 1-based layer `layer`: 0.8 - 0.6 exp(-0.3 (layer - 1)), or a constant."""
    return constant if constant is not None else 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


class NeonRMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 or wider
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [b, s, dim] of rotary position embeddings (non-interleaved halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / dim))
    freqs = (inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)  # [b, s, dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, dim] rotated by position: x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scaling + mask): q [b, n, s, d], k [b, g, t, d] (n = r g), mask [b, 1, s, t]."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # query head i reads key head i // r
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling + mask
    return F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs [b, n, s, t] x v [b, g, t, d_v] -> [b, n, s, d_v]."""
    return torch.matmul(probs, v.repeat_interleave(probs.size(1) // v.size(1), dim=1))


class NeonAttention(nn.Module):
    def __init__(self, config: NeonHFConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        d, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.diff = config.diff_attention in ("matched", "expressive")  # V1: Q = [Q1; Q2] per head
        self.v2 = config.diff_attention == "v2"
        if config.diff_attention == "matched":
            self.heads, self.kv_heads, self.qk_dim, self.v_dim = heads // 2, kv_heads // 2, d, 2 * d
        else:  # 'off', 'expressive' and 'v2'
            self.heads, self.kv_heads, self.qk_dim, self.v_dim = heads, kv_heads, d, d
        halves = 2 if self.diff else 1  # Q = [Q1; Q2], K = [K1; K2] per head under DiffAttention
        D = config.hidden_size
        q_heads = 2 * self.heads if self.v2 else self.heads * halves  # V2: query heads 2h, 2h + 1 per head h
        self.q_proj = nn.Linear(D, q_heads * self.qk_dim, bias=False)
        self.k_proj = nn.Linear(D, self.kv_heads * halves * self.qk_dim, bias=False)
        self.v_proj = nn.Linear(D, self.kv_heads * self.v_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, D, bias=False)
        self.scaling = self.qk_dim ** 0.5 if config.ngpt else self.qk_dim ** -0.5
        if config.ngpt:  # one entry per query channel, heads in q_proj's order
            self.s_qk = ngpt_vector(config, "s_qk", self.heads * halves * self.qk_dim)
        if self.diff:
            self.lambda_init = lambda_init_for_layer(layer_idx + 1, config.diff_lambda_init)
            self.lambda_q1 = nn.Parameter(torch.zeros(self.qk_dim))
            self.lambda_k1 = nn.Parameter(torch.zeros(self.qk_dim))
            self.lambda_q2 = nn.Parameter(torch.zeros(self.qk_dim))
            self.lambda_k2 = nn.Parameter(torch.zeros(self.qk_dim))
            self.subln = NeonRMSNorm(self.v_dim, eps=1e-5)  # one scale shared by the heads
        if self.v2:
            self.lambda_proj = nn.Linear(D, self.heads, bias=False)  # W_lambda

    def transform_qk(self, q: torch.Tensor, k: torch.Tensor):
        """After RoPE. nGPT: q, k <- Norm(q) s_qk, Norm(k) s_qk per head. A key head serves
        r = n / g query heads (GQA), each with its own s_qk: (Norm(q) s_qk).(Norm(k) s_qk) is
        written (Norm(q) s_qk^2).Norm(k) so the cache keeps one normalised key per key head."""
        if not self.config.ngpt:
            return q, k
        s_qk = ngpt_effective(self.config, "s_qk", self.s_qk).view(-1, 1, self.qk_dim)  # [heads, 1, d]
        return unit_norm(q) * s_qk * s_qk, unit_norm(k)

    def diff_lambda(self) -> torch.Tensor:
        """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, in fp32 (or wider)."""
        dt = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        lq1, lk1, lq2, lk2 = (p.to(dt) for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2))
        return torch.exp(torch.dot(lq1, lk1)) - torch.exp(torch.dot(lq2, lk2)) + self.lambda_init

    def diff_v2(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """head_h = O_2h - sigmoid(W_lambda x)_h O_2h+1: out [b, 2n, s, d], x [b, s, D] -> [b, n, s, d]."""
        lam = torch.sigmoid(self.lambda_proj(x)).transpose(1, 2)[..., None]  # [b, n, s, 1]
        return out[:, 0::2] - lam * out[:, 1::2]

    def forward(self, x, cos, sin, attention_mask, cache: Cache | None = None):
        b, s, _ = x.shape
        halves = 2 if self.diff else 1
        # heads in order (head, half): Q1_0, Q2_0, Q1_1, ... ; each half is rotated with true positions
        q = self.q_proj(x).view(b, s, -1, self.qk_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads * halves, self.qk_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.v_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = self.transform_qk(q, k)
        if cache is not None:  # keys [b, halves * g, t, d] and values [b, g, t, d_v] of all tokens so far
            k, v = cache.update(k, v, self.layer_idx)
        mask = causal_window_mask(attention_mask, b, s, k.size(2), self.config.sliding_window, q.dtype, q.device)
        if not self.diff:
            out = weighted_values(attention_probs(q, k, self.scaling, mask), v)  # [b, q heads, s, d]
            if self.v2:
                out = self.diff_v2(out, x)
        else:
            t = k.size(2)
            q1, q2 = q.view(b, self.heads, 2, s, self.qk_dim).unbind(2)
            k1, k2 = k.view(b, self.kv_heads, 2, t, self.qk_dim).unbind(2)
            a1 = attention_probs(q1, k1, self.scaling, mask)
            a2 = attention_probs(q2, k2, self.scaling, mask)
            lam = self.diff_lambda().to(a1.dtype)
            out = weighted_values(a1 - lam * a2, v)  # [b, n, s, d_v]
            out = self.subln(out) * (1.0 - self.lambda_init)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.v_dim))


class NeonMLP(nn.Module):
    """SwiGLU: down(SiLU(gate x) * up x). nGPT: u = up x * s_u, v = gate x * s_v sqrt(D)."""

    def __init__(self, config: NeonHFConfig):
        super().__init__()
        self.config = config
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)
        if config.ngpt:
            self.s_u = ngpt_vector(config, "s_u", F_)
            self.s_v = ngpt_vector(config, "s_v", F_)

    def forward(self, x):
        if not self.config.ngpt:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        u = self.up_proj(x) * ngpt_effective(self.config, "s_u", self.s_u)
        v = self.gate_proj(x) * ngpt_effective(self.config, "s_v", self.s_v) * math.sqrt(self.config.hidden_size)
        return self.down_proj(u * F.silu(v))


class NeonFunction(nn.Module):
    """One FlamingMoE function: 'linear' W x; 'swiglu' down(SiLU(gate x) * up x); 'lowrank' out(in x)."""

    def __init__(self, config: NeonHFConfig, kind: str):
        super().__init__()
        D, self.kind = config.hidden_size, kind
        if kind == "linear":
            self.proj = nn.Linear(D, D, bias=False)
        elif kind == "swiglu":
            width = config.flaming_ffn_hidden_size or config.intermediate_size
            self.gate_proj = nn.Linear(D, width, bias=False)
            self.up_proj = nn.Linear(D, width, bias=False)
            self.down_proj = nn.Linear(width, D, bias=False)
        else:  # lowrank
            self.in_proj = nn.Linear(D, config.flaming_lowrank_rank, bias=False)
            self.out_proj = nn.Linear(config.flaming_lowrank_rank, D, bias=False)

    def forward(self, x):
        if self.kind == "linear":
            return self.proj(x)
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.out_proj(self.in_proj(x))


def gumbel_noise(shape, device, dtype) -> torch.Tensor:
    u = torch.rand(shape, device=device, dtype=dtype).clamp_min(torch.finfo(dtype).tiny)
    return -torch.log((-torch.log(u)).clamp_min(torch.finfo(dtype).tiny))


class NeonFlamingMoE(nn.Module):
    """r = x' + sum over banks of the chosen functions' weighted outputs; x' [b, s, D]."""

    def __init__(self, config: NeonHFConfig):
        super().__init__()
        self.config = config
        D, G, n = config.hidden_size, config.flaming_global_functions, config.flaming_layer_functions
        specs = io_specs(config.flaming_io_functions, "layer")  # IO functions: per-layer bank entries n, n + 1, ...
        G += len(io_specs(config.flaming_io_functions, "global"))  # global IO functions: entries G, G + 1, ...
        self.global_router = nn.Linear(D, G, bias=False) if G else None
        self.layer_router = nn.Linear(D, n + len(specs), bias=False) if n + len(specs) else None
        self.layer_functions = nn.ModuleList([NeonFunction(config, config.flaming_layer_kind) for _ in range(n)])
        if specs:
            self.io_functions = nn.ModuleDict({s.name: build_io_function(config, s) for s in specs})
        # the model's global functions, learned then IO (not children: stored once, in the model)
        self._global: tuple = ()

    def route(self, router: nn.Linear, x: torch.Tensor):
        """x [T, D] -> (weights [T, n], chosen [T, n] bool)."""
        c = self.config
        logits = router(x).float()
        if c.flaming_router == "topk":
            p = torch.softmax(logits, dim=-1)
            top = torch.topk(p, c.flaming_topk, dim=-1).indices
            chosen = torch.zeros_like(p, dtype=torch.bool).scatter(1, top, True)
            return torch.where(chosen, p, torch.zeros_like(p)), chosen
        scores = logits + gumbel_noise(logits.shape, logits.device, logits.dtype) if self.training else logits
        y = torch.softmax(scores / c.flaming_gumbel_temperature, dim=-1)
        top = torch.topk(scores, c.flaming_topk, dim=-1).indices
        chosen = torch.zeros_like(y, dtype=torch.bool).scatter(1, top, True)
        return torch.where(chosen, (y - y.detach()) + 1.0, torch.zeros_like(y)), chosen

    @staticmethod
    def apply_functions(functions, weights, chosen, x, io=None):
        """sum_i weight_i f_i(x) over the chosen functions only (tokens gathered per function).
        IO functions also get their tokens' context rows: io = context [T, C]."""
        out = torch.zeros_like(x)
        for i, f in enumerate(functions):
            rows = chosen[:, i].nonzero().squeeze(-1)
            if rows.numel():
                if isinstance(f, NeonFunction):
                    y = f(x[rows])
                else:
                    y = f(x[rows], io[rows])
                out = out.index_add(0, rows, (weights[rows, i, None] * y).to(x.dtype))
        return out

    def forward(self, x, io=None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = x if self.config.flaming_identity else torch.zeros_like(x)
        banks = []
        if self.global_router is not None:
            banks.append((self.global_router, [*self._global[0], *self._global[1]]))
        if self.layer_router is not None:
            io_fns = list(self.io_functions.values()) if hasattr(self, "io_functions") else []
            banks.append((self.layer_router, [*self.layer_functions, *io_fns]))
        for router, functions in banks:
            weights, chosen = self.route(router, x)
            out = out + self.apply_functions(functions, weights, chosen, x, io)
        return out.view(shape)


class NeonDecoderLayer(nn.Module):
    def __init__(self, config: NeonHFConfig, layer_idx: int):
        super().__init__()
        self.self_attn = NeonAttention(config, layer_idx)
        self.mlp = NeonFlamingMoE(config) if config.flaming_moe == "mlp" else NeonMLP(config)
        self.config = config
        if config.ngpt:  # no norms; alpha_A, alpha_M
            self.input_layernorm = self.post_attention_layernorm = nn.Identity()
            self.attn_alpha = ngpt_vector(config, "alpha", config.hidden_size)
            self.mlp_alpha = ngpt_vector(config, "alpha", config.hidden_size)
        else:
            self.input_layernorm = NeonRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_attention_layernorm = NeonRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.flaming = None
        if config.flaming_moe == "between":  # FlamingMoE between attention and MLP (nGPT: alpha_F, no norm)
            self.flaming = NeonFlamingMoE(config)
            if config.ngpt:
                self.pre_flaming_layernorm = nn.Identity()
                self.flaming_alpha = ngpt_vector(config, "alpha", config.hidden_size)
            else:
                self.pre_flaming_layernorm = NeonRMSNorm(config.hidden_size, config.rms_norm_eps)

    def residual(self, h: torch.Tensor, update: torch.Tensor, which: str) -> torch.Tensor:
        """h + update; nGPT: Norm(h + |alpha_which| (Norm(update) - h))."""
        if not self.config.ngpt:
            return h + update
        alpha = ngpt_effective(self.config, "alpha", getattr(self, f"{which}_alpha")).abs()
        return unit_norm(h + alpha * (unit_norm(update) - h))

    def forward(self, h, cos, sin, attention_mask, cache=None, io=None):
        h = self.residual(h, self.self_attn(self.input_layernorm(h), cos, sin, attention_mask, cache), "attn")
        if self.flaming is not None:
            h = self.residual(h, self.flaming(self.pre_flaming_layernorm(h), io), "flaming")
        x = self.post_attention_layernorm(h)
        return self.residual(h, self.mlp(x, io) if self.config.flaming_moe == "mlp" else self.mlp(x), "mlp")


class NeonPreTrainedModel(PreTrainedModel):
    config_class = NeonHFConfig
    config: NeonHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["NeonDecoderLayer"]
    _supports_sdpa = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if self.config.ngpt:  # scaling vectors at their stored "scale" value
            scales = ngpt_scaling(self.config)
            for name, key in (("s_qk", "s_qk"), ("s_u", "s_u"), ("s_v", "s_v"), ("s_z", "s_z"),
                              ("attn_alpha", "alpha"), ("mlp_alpha", "alpha")):
                p = module._parameters.get(name)
                if p is not None:
                    init.constant_(p, scales[key][1])
        if isinstance(module, NeonAttention) and module.diff:
            for p in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                init.normal_(p, mean=0.0, std=0.1)


def causal_window_mask(attention_mask, b, s, t, window, dtype, device) -> torch.Tensor:
    """Additive mask [b, 1, s, t]: the s new tokens are the last of the t tokens the keys hold
    (all tokens so far, or the last ones a sliding-window cache keeps).

    Query token i (index t - s + i) sees key token j if j <= i, j > i - window (when a window is
    set) and attention_mask (padding, [b, >= t]) marks j as a real token."""
    q_idx = torch.arange(t - s, t, device=device)[:, None]
    k_idx = torch.arange(t, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    allowed = allowed[None, None].expand(b, 1, s, t)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -t:].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class NeonModel(NeonPreTrainedModel):
    def __init__(self, config: NeonHFConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([NeonDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.Identity() if config.ngpt else NeonRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.flaming_moe != "off":
            self._build_global_bank(config)
        self.io_specs = io_specs(config.flaming_io_functions) if config.flaming_moe != "off" else []
        if self.io_specs:  # the token context's layout and its providers (not submodules: no weights of ours)
            self.io_layout = ContextLayout(self.io_specs, io_settings(config))
            self.io_providers = context_providers(self.io_specs, io_settings(config))
            self.io_layout.attach([m for m in self.modules() if getattr(m, "is_io", False)])
        self.post_init()

    def _build_global_bank(self, config: NeonHFConfig) -> None:
        """The global bank's functions, held once here and shared by every layer's block: the
        learned ones (`flaming_global_functions.<g>`), then the `bank=global` IO functions
        (`flaming_global_io_functions.<name>`)."""
        learned, io = [], []
        if config.flaming_global_functions:
            self.flaming_global_functions = nn.ModuleList(
                [NeonFunction(config, config.flaming_global_kind) for _ in range(config.flaming_global_functions)])
            learned = list(self.flaming_global_functions)
        specs = io_specs(config.flaming_io_functions, "global")
        if specs:
            self.flaming_global_io_functions = nn.ModuleDict({s.name: build_io_function(config, s) for s in specs})
            io = list(self.flaming_global_io_functions.values())
        for layer in self.layers:
            block = layer.flaming if layer.flaming is not None else layer.mlp
            block._global = (learned, io)

    def io_inputs(self, input_ids, position_ids, attention_mask, cache, seen: int, like: torch.Tensor):
        """The context [b * s, C] of the s new tokens (the ids window and the IO kinds' columns).
        With a cache, the ids before them and the frozen models' caches come from its `neon_io` state."""
        if input_ids is None:
            raise ValueError("a model with FlamingMoE IO functions needs input_ids (they give the token context)")
        b, s = input_ids.shape
        state = getattr(cache, "neon_io", None) if cache is not None else None
        if cache is not None and (state is None or seen == 0):
            if seen:
                raise ValueError("the cache holds earlier tokens but no FlamingMoE IO state: build it by calling "
                                 "this model with use_cache=True from the first token")
            state = cache.neon_io = IOCacheState(input_ids.new_full((b, self.config.flaming_io_context_window - 1),
                                                                    -1, dtype=torch.long))
        context = build_context(self.io_layout, self.io_providers, input_ids, position_ids, dtype=like.dtype,
                                attention_mask=attention_mask, cache=state)
        return context.reshape(b * s, -1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache: bool | None = None, past_key_values: Cache | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = h.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        seen = cache.get_seq_length() if cache is not None else 0  # tokens before these s
        if position_ids is None:
            position_ids = (torch.arange(s, device=h.device) + seen)[None].expand(b, s)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        io = self.io_inputs(input_ids, position_ids, attention_mask, cache, seen, h) if self.io_specs else None
        for layer in self.layers:
            h = layer(h, cos, sin, attention_mask, cache, io)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache if use_cache else None)


class NeonForCausalLM(NeonPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NeonHFConfig):
        if config.ngpt and config.tie_word_embeddings:
            raise ValueError("ngpt=True needs tie_word_embeddings=False (E_in and E_out are separate)")
        super().__init__(config)
        self.model = NeonModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.ngpt:
            self.lm_head.s_z = ngpt_vector(config, "s_z", config.vocab_size)
        self.post_init()
        if config.ngpt and self.lm_head.weight.device.type != "meta":
            self.normalize_ngpt_weights()  # nGPT starts on the sphere

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search: the attention cache and, with IO functions, the ids window and the frozen
        models' caches follow the surviving beams."""
        cache.reorder_cache(beam_idx)
        state = getattr(cache, "neon_io", None)
        if state is not None:
            state.reorder(beam_idx)
        return cache

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """nGPT: z <- z * s_z."""
        return logits * ngpt_effective(self.config, "s_z", self.lm_head.s_z) if self.config.ngpt else logits

    # each weight matrix nGPT keeps on the sphere -> the dim its D-space vectors run along
    NGPT_UNIT_DIM = {"embed_tokens.weight": 1, "lm_head.weight": 1, "q_proj.weight": 1, "k_proj.weight": 1,
                     "v_proj.weight": 1, "gate_proj.weight": 1, "up_proj.weight": 1, "o_proj.weight": 0,
                     "down_proj.weight": 0,
                     # FlamingMoE functions: low-rank A rows, B columns; linear d -> d by output columns
                     "in_proj.weight": 1, "out_proj.weight": 0, ".proj.weight": 0,
                     # IO functions: W_out columns (out_proj above), a store's W_q rows (neon/ngpt.py)
                     "query_proj.weight": 1}

    @torch.no_grad()
    def normalize_ngpt_weights(self) -> None:
        """Put every weight vector that lives in D-space on the unit sphere (after each step)."""
        for name, p in self.named_parameters():
            dim = next((d for suffix, d in self.NGPT_UNIT_DIM.items() if name.endswith(suffix)), None)
            if dim is not None:
                p.copy_(unit_norm(p, dim=dim))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None, logits_to_keep: int = 0,
                past_key_values: Cache | None = None, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.scale_logits(self.lm_head(h))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


NeonHFConfig.register_for_auto_class()
NeonForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["NeonForCausalLM", "NeonModel", "NeonPreTrainedModel", "NeonFlamingMoE", "NeonFunction"]
