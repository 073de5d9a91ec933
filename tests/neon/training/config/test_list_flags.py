"""List settings take several values on the command line, as Megatron-LM's flags do
(`--iterations-to-skip 3 7`), or one YAML list; each item is checked against the field's type."""

from pathlib import Path

import pytest

from neon.training.config import ConfigError, resolve

TOKENIZER = str(Path(__file__).resolve().parents[3] / "data" / "golden_all_features" / "corpus" / "tok.model")


def _resolve(*flags):
    return resolve(["--data-path", "x", "--tokenizer-model", TOKENIZER, *flags], check_files=False)


@pytest.mark.parametrize("flags, expected", [
    (["--iterations-to-skip", "3", "7"], [3, 7]),
    (["--iterations-to-skip", "[3, 7]"], [3, 7]),
    (["--iterations-to-skip", "5"], [5]),
])
def test_list_flags_take_several_values(flags, expected):
    assert _resolve(*flags).schedule.iterations_to_skip == expected


def test_a_list_item_of_the_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"schedule.iterations_to_skip\[1\]='x' has the wrong type: expected int"):
        _resolve("--iterations-to-skip", "3", "x")


def test_text_list_items_stay_text():
    cfg = _resolve("--data-path", "0.7", "a", "0.3", "b")
    assert cfg.data.data_path == ["0.7", "a", "0.3", "b"]
