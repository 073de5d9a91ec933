"""Where each resolved value came from: default < recipe:<feature> < config file < command line,
recorded in Config.provenance and written as a comment after each value of config.yaml, which
still loads back (yaml.safe_load, from_dict, and as a --config file) to the same configuration."""

import re

import yaml

from neon.training.config import dump_yaml, from_dict, resolve


def _resolve(corpus, tmp_path, yaml_values: dict, *flags):
    tokenizer, data = corpus
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(yaml_values))
    return resolve(["--config", str(config), "--data-path", data, "--tokenizer-model", tokenizer,
                    "--split", "90,10,0", "--seq-length", "32", "--max-position-embeddings", "64", *flags],
                   check_files=False)


def test_each_layer_wins_over_the_one_below_and_is_recorded(corpus, tmp_path):
    cfg = _resolve(corpus, tmp_path, {"model": {"num_layers": 4, "hidden_dropout": 0.1},
                                      "schedule": {"lr_warmup_iters": 3}},
                   "--num-layers", "6", "--ngpt", "--make-vocab-size-divisible-by", "96")
    expected = {
        "model.num_layers": (6, "command line"),            # flag over YAML
        "model.hidden_dropout": (0.1, "config file"),
        "model.ngpt": (True, "command line"),
        "optimizer.weight_decay": (0.0, "recipe:ngpt"),       # nGPT's recipe over the 0.1 default
        "schedule.lr_warmup_iters": (3, "config file"),       # YAML over nGPT's recipe (0)
        "model.vocab_size": (288, "tokenizer"),               # 256 pieces padded to a multiple of 96
        "schedule.seed": (1234, "default"),
        "optimizer.lr": (1e-2, "recipe:ngpt"),                # no lr given: nGPT's
        "optimizer.min_lr": (1e-3, "recipe:ngpt"),
        "model.ngpt_alpha_sz_scale": ("inv_d", "recipe:ngpt"),
    }
    got = {key: (getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]), cfg.origin(key)) for key in expected}
    assert got == expected


def test_a_flag_wins_over_the_recipe_and_the_recipe_waits_for_its_feature(corpus, tmp_path):
    cfg = _resolve(corpus, tmp_path, {"optimizer": {"weight_decay": 0.05}}, "--ngpt", "--lr-warmup-iters", "2")
    assert (cfg.optimizer.weight_decay, cfg.origin("optimizer.weight_decay")) == (0.05, "config file")
    assert (cfg.schedule.lr_warmup_iters, cfg.origin("schedule.lr_warmup_iters")) == (2, "command line")
    plain = _resolve(corpus, tmp_path, {})
    assert (plain.optimizer.weight_decay, plain.origin("optimizer.weight_decay")) == (0.1, "default")


def test_a_recipe_min_lr_goes_with_its_lr(corpus, tmp_path):
    """Where the user chose the lr, nGPT's min_lr (meant for its own lr 1e-2) stays out too."""
    cfg = _resolve(corpus, tmp_path, {"optimizer": {"lr": 3e-3}}, "--ngpt")
    assert (cfg.optimizer.lr, cfg.origin("optimizer.lr")) == (3e-3, "config file")
    assert (cfg.optimizer.min_lr, cfg.origin("optimizer.min_lr")) == (3e-5, "default")
    own = _resolve(corpus, tmp_path, {}, "--ngpt", "--min-lr", "2e-3")
    assert (own.optimizer.lr, own.origin("optimizer.lr")) == (1e-2, "recipe:ngpt")
    assert (own.optimizer.min_lr, own.origin("optimizer.min_lr")) == (2e-3, "command line")


def test_config_yaml_shows_origins_and_loads_back_unchanged(corpus, tmp_path):
    cfg = _resolve(corpus, tmp_path, {"model": {"diff_attention": "matched"}}, "--ngpt", "--lr", "1e-3")
    text = dump_yaml(cfg)
    lines = text.splitlines()
    assert "  weight_decay: 0.0  # recipe:ngpt" in lines
    assert "  diff_attention: matched  # config file" in lines
    assert "  lr: 0.001  # command line" in lines
    assert "  flaming_moe: 'off'  # default" in lines  # quoted: YAML 1.1 would read off as False
    setting_lines = [line for line in lines if line.startswith("  ")]
    assert all(re.search(r"  # (default|recipe:\w+|config file|command line|tokenizer)$", line)
               for line in setting_lines), [line for line in setting_lines if "  # " not in line][:5]
    loaded = yaml.safe_load(text)
    assert loaded == cfg.to_dict()
    assert from_dict(loaded) == cfg
    again = tmp_path / "config.yaml"
    again.write_text(text)
    tokenizer, data = corpus
    reread = resolve(["--config", str(again)], check_files=False)
    assert reread == cfg, "config.yaml is a valid --config that reproduces the run's settings"
