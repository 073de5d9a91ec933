"""Bad configurations fail before any model is built, naming the setting and the fix."""

import pytest

from neon.config import NeonConfig
from neon.errors import ConfigError

GOOD = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=96, vocab_size=128)


@pytest.mark.parametrize("overrides,setting,fix", [
    (dict(num_attention_heads=4, tensor_model_parallel_size=8), "num_attention_heads=4",
     "tensor-parallel size that divides"),
    (dict(num_query_groups=3), "num_query_groups=3", "divides the query heads"),
    (dict(num_layers=3, pipeline_model_parallel_size=2), "num_layers=3", "multiple of the pipeline"),
    (dict(hidden_size=66), "hidden_size=66", "kv_channels"),
    (dict(vocab_size=127, tensor_model_parallel_size=2), "vocab_size=127", "pad the vocabulary"),
    (dict(ffn_hidden_size=97, tensor_model_parallel_size=2, num_query_groups=2), "ffn_hidden_size=97",
     "multiple of the tensor-parallel size"),
    (dict(sliding_window=0), "sliding_window=0", "positive window"),
    (dict(diff_attention="twice"), "diff_attention='twice'", "one of"),
    (dict(num_attention_heads=4, num_query_groups=2, hidden_size=64, diff_attention="matched",
          tensor_model_parallel_size=1, kv_channels=32), None, None),
    (dict(num_attention_heads=2, num_query_groups=1, hidden_size=64, diff_attention="matched",
          kv_channels=32), "num_query_groups=1", "even number of key/value heads"),
    (dict(num_attention_heads=8, num_query_groups=2, diff_attention="matched", tensor_model_parallel_size=2),
     "num_query_groups=2", "2 * tp * k key/value heads"),
    (dict(num_attention_heads=3, num_query_groups=1, hidden_size=48, diff_attention="matched"),
     "num_attention_heads=3", "even number of heads"),
    (dict(sequence_parallel=True), "sequence_parallel=True", "raise the tensor-parallel size"),
    (dict(num_layers=0), "num_layers=0", "num_layers > 0"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_bad_config_names_setting_and_fix(overrides, setting, fix):
    if setting is None:  # a valid neighbour of the bad cases: must build
        NeonConfig(**{**GOOD, **overrides})
        return
    assert_names_setting_and_fix({**GOOD, **overrides}, setting, fix)


def assert_names_setting_and_fix(settings: dict, setting: str, fix: str) -> None:
    """NeonConfig(**settings) fails with a message that starts with `setting` and gives `fix`."""
    with pytest.raises(ConfigError) as err:
        NeonConfig(**settings)
    message = str(err.value)
    assert message.startswith(setting), message
    assert "Fix:" in message and fix in message, message


def test_features_off_is_mistral():
    cfg = NeonConfig(**GOOD, sliding_window=16)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.window_size == (15, 0), "HF window W = the token plus W-1 before it"
    assert cfg.head_dim == 16
