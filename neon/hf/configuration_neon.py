"""NeonHFConfig: the Hugging Face configuration of a Neon model (model_type "neon").

Mistral's fields plus the Neon switches. With every switch off it describes a Mistral model and
`NeonForCausalLM` computes exactly what `MistralForCausalLM` computes. This file is copied next
to a saved model (with modeling_neon.py and the IO kinds it uses) so `AutoConfig`/`AutoModelForCausalLM`
load it with `trust_remote_code=True`: it imports nothing from the neon package. Its choices are
the features' settings' (tests/neon/test_features.py checks they agree).
"""

from __future__ import annotations

from dataclasses import field

from transformers import PreTrainedConfig

DIFF_ATTENTION_MODES = ("off", "matched", "expressive", "v2")
FLAMING_PLACEMENTS = ("off", "between", "mlp")
FLAMING_KINDS = ("linear", "swiglu", "lowrank")
NGPT_ALPHA_SZ_SCALES = ("inv_sqrt_d", "inv_d")


class NeonHFConfig(PreTrainedConfig):
    model_type = "neon"

    # --- Mistral -----------------------------------------------------------------------
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    sliding_window: int | None = None
    attention_dropout: float | int = 0.0

    # --- Neon: each feature's hf_fields (neon/features/), with NeonConfig's names and defaults ---
    # (this file travels with exported models and cannot import the registry;
    # tests/neon/test_features.py checks that the fields here are exactly the registry's)
    diff_attention: str = "off"
    """'off', 'matched' (H/2 differential heads, V of width 2d), 'expressive' (doubled Q/K) or 'v2'
    (DiffAttention V2: 2H query heads, pairs subtracted with lambda = sigmoid(W_lambda x))."""
    diff_lambda_init: float | None = None
    """Constant lambda_init; None: 0.8 - 0.6 exp(-0.3 (l - 1)) for 1-based layer l."""
    ngpt: bool = False
    """nGPT (normalized transformer): added by the nGPT work; seams are marked in modeling_neon.py."""
    ngpt_alpha_sz_scale: str = "inv_sqrt_d"
    """Stored scale of nGPT's alpha and s_z: 'inv_sqrt_d' (1/sqrt(D); models exported before this
    field existed) or 'inv_d' (1/D)."""
    flaming_moe: str = "off"
    """FlamingMoE placement: 'off', 'between' (attention and MLP, own pre-norm) or 'mlp' (replaces it)."""
    flaming_global_functions: int = 0
    flaming_layer_functions: int = 0
    flaming_global_kind: str = "linear"
    flaming_layer_kind: str = "linear"
    """'linear' (d -> d), 'swiglu' (width flaming_ffn_hidden_size) or 'lowrank' (d -> r -> d)."""
    flaming_ffn_hidden_size: int | None = None
    flaming_lowrank_rank: int = 16
    flaming_router: str = "gumbel"
    """'gumbel' (hard, weight 1; noise only in training) or 'topk' (softmax weights of the top k)."""
    flaming_topk: int = 1
    flaming_gumbel_temperature: float = 1.0
    flaming_identity: bool = True
    flaming_io_functions: list[str] = field(default_factory=list)
    """IO functions (neon/io/), Neon's strings with their sources:
    'name=facts,kind=store,source=/data/store,...', 'kind=callable,source=module:function',
    'kind=model,source=/models/a,layer=-1'."""
    flaming_io_context_window: int = 8
    """W: the token ids (the token and the W - 1 before it) in each IO context row."""
    flaming_io_store_swap: bool = False
    """Accept a store / frozen model other than the one recorded in flaming_io_sources."""
    flaming_io_reuse_search: bool = True
    """Search a global-bank `context`-query store once per forward for every layer (the same result)."""
    # written by tools/convert_to_hf.py (not a Neon setting): name -> the identity of the source
    # the model was trained with (store: entries, key_dim, content sha256; model: sha256, layer)
    flaming_io_sources: dict | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.diff_attention not in DIFF_ATTENTION_MODES:
            raise ValueError(f"diff_attention={self.diff_attention!r}: use one of {DIFF_ATTENTION_MODES}")
        if self.diff_attention == "matched" and self.num_key_value_heads % 2:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads}: diff_attention='matched' "
                             "pairs key/value heads, use an even number")
        if self.diff_attention == "v2" and self.ngpt:
            raise ValueError("diff_attention='v2' with ngpt=True is not built: use one of them, or nGPT "
                             "with diff_attention='matched' or 'expressive'")
        if self.ngpt_alpha_sz_scale not in NGPT_ALPHA_SZ_SCALES:
            raise ValueError(f"ngpt_alpha_sz_scale={self.ngpt_alpha_sz_scale!r}: use one of {NGPT_ALPHA_SZ_SCALES}")
        if self.flaming_moe not in FLAMING_PLACEMENTS:
            raise ValueError(f"flaming_moe={self.flaming_moe!r}: use one of {FLAMING_PLACEMENTS}")
        for name in ("flaming_global_kind", "flaming_layer_kind"):
            if getattr(self, name) not in FLAMING_KINDS:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {FLAMING_KINDS}")
        if self.flaming_io_functions and self.flaming_moe == "off":
            raise ValueError("flaming_io_functions need FlamingMoE: set flaming_moe='between' or 'mlp'")
        if self.flaming_router not in ("gumbel", "topk"):
            raise ValueError(f"flaming_router={self.flaming_router!r}: use 'gumbel' or 'topk'")
        return super().__post_init__(**kwargs)

    @property
    def rope_theta(self) -> float:
        params = self.rope_parameters or {}
        return float(params.get("rope_theta", 10000.0))


__all__ = ["NeonHFConfig"]
