"""The run configuration: YAML + Megatron-LM flags, every NeonConfig field exposed, and each bad
setting stopped before anything is built, with a message naming the setting and the fix."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from neon.config import NeonConfig
from neon.training.config import (
    MODEL_FIELDS,
    ConfigError,
    ModelSection,
    build_parser,
    resolve,
)

REPO = Path(__file__).resolve().parents[3]
MEGATRON_FLAGS = [
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage",
    "--expert-model-parallel-size", "--sequence-parallel", "--micro-batch-size", "--global-batch-size",
    "--seq-length", "--train-iters", "--lr", "--min-lr", "--lr-decay-style", "--lr-warmup-iters", "--clip-grad",
    "--bf16", "--data-path", "--split", "--tokenizer-model", "--save", "--load", "--save-interval",
    "--eval-interval", "--eval-iters", "--log-interval", "--wandb-project", "--tensorboard-dir", "--num-layers",
    "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups", "--max-position-embeddings",
    "--rotary-base", "--recompute-granularity", "--use-distributed-optimizer", "--seed",
    "--weight-decay", "--adam-beta2", "--fp8-format", "--norm-epsilon", "--exit-interval", "--ckpt-step",
    "--train-data-path", "--valid-data-path", "--test-data-path", "--mock-data", "--tokenizer-type",
    "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss",
]  # --num-experts (megatron's MoE layers) is refused: tests/neon/training/config/test_inherited_flags.py


def base(corpus, *extra):
    tokenizer, data = corpus
    return ["--data-path", data, "--tokenizer-model", tokenizer, "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
            "--max-position-embeddings", "64", "--split", "90,10,0", *extra]


def test_help_lists_megatron_flags_with_defaults(capsys):
    text = build_parser().format_help()
    for flag in MEGATRON_FLAGS:
        assert f"  {flag}" in text or f", {flag}" in text, flag
    assert "[schedule.lr_decay_style, default: 'cosine']" in text
    assert "[model.diff_attention, default: 'off']" in text


# NeonConfig's own settings (Mistral's and the Neon switches) and megatron-core ones users set.
EXPECTED_MODEL_SETTINGS = {
    "vocab_size", "max_position_embeddings", "rope_theta", "sliding_window", "tie_word_embeddings",
    "diff_attention", "diff_lambda_init", "ngpt", "flaming_moe", "flaming_router", "flaming_topk",
    "normalization", "layernorm_epsilon", "gated_linear_unit", "hidden_dropout", "attention_dropout",
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "num_moe_experts", "recompute_granularity", "recompute_method", "recompute_num_layers", "bf16", "fp16",
    "fp8", "qk_layernorm",
}
# The NeonConfig fields that are not model settings (megatron-core 0.16.1): owned by the parallelism
# section, derived by the run, or not expressible in YAML (callables, dtypes, objects).
NOT_MODEL_SETTINGS = {
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "sequence_parallel",  # parallelism section
    "virtual_pipeline_model_parallel_size", "context_parallel_size", "expert_tensor_parallel_size",
    "params_dtype", "pipeline_dtype", "window_size",  # derived
    "activation_func", "init_method", "output_layer_init_method", "embedding_init_method", "timers",
    "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func", "param_sync_func",
    "autocast_dtype", "_cpu_offloading_context", "pipeline_model_parallel_layout", "attention_backend",
    "cuda_graph_scope", "quant_recipe",  # not representable
}


def test_model_section_exposes_neonconfig_settings_and_nothing_it_cannot_express():
    assert EXPECTED_MODEL_SETTINGS <= set(MODEL_FIELDS), sorted(EXPECTED_MODEL_SETTINGS - set(MODEL_FIELDS))
    fields = {f.name for f in dataclasses.fields(NeonConfig) if f.init}
    assert fields - set(MODEL_FIELDS) == NOT_MODEL_SETTINGS, "every other NeonConfig field is a model setting"
    assert list(MODEL_FIELDS)[:5] == ["vocab_size", "max_position_embeddings", "rope_theta", "sliding_window",
                                      "tie_word_embeddings"], "NeonConfig's own settings come first"
    model = ModelSection()
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (2, 128, 4)
    assert (model.diff_attention, model.ngpt, model.flaming_moe) == ("off", False, "off")
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    missing = [name for name in MODEL_FIELDS if "--" + name.replace("_", "-") not in known]
    assert not missing, f"model settings without a flag: {missing}"


def test_yaml_then_flags_then_derived_values(corpus, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"hidden_dropout": 0.1, "num_layers": 4},
                                        "optimizer": {"lr": "1e-3", "weight_decay": 0.05},
                                        "schedule": {"global_batch_size": 16}}))
    cfg = resolve(["--config", str(cfg_file), *base(corpus), "--lr", "2e-3", "--num-layers", "6"], world_size=2)
    assert cfg.optimizer.lr == 2e-3 and cfg.optimizer.weight_decay == 0.05  # flag wins, YAML kept
    assert cfg.model.num_layers == 6 and cfg.model.hidden_dropout == 0.1
    assert cfg.model.vocab_size == 256  # from the tokenizer, padded to a multiple of 128
    assert cfg.data_parallel_size == 2 and cfg.num_microbatches == 8  # 16 samples / (1 per micro x 2 DP)
    nc = cfg.neon_config()
    assert nc.num_layers == 6 and nc.tensor_model_parallel_size == 1


def test_feature_defaults_apply_below_explicit_settings(corpus):
    ngpt = resolve([*base(corpus), "--ngpt", "--lr-warmup-iters", "5"], check_files=False)
    assert ngpt.optimizer.weight_decay == 0.0 and ngpt.schedule.lr_warmup_iters == 5
    plain = resolve(base(corpus), check_files=False)
    assert plain.optimizer.weight_decay == 0.1


BAD = [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size=6", "multiple of 4"),
    (["--tensor-model-parallel-size", "2"], 3, "does not divide the 3 processes", "launch a multiple"),
    (["--context-parallel-size", "2"], 3, "does not divide the 3 processes", "TP x PP x CP"),
    (["--context-parallel-size", "3", "--seq-length", "16"], 3, "--seq-length=16: is not divisible by 2 x "
     "context_parallel_size = 6", "multiple of 6"),
    (["--context-parallel-size", "0"], 1, "--context-parallel-size=0", "positive integer"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "needs pipeline parallelism", "--pipeline-model"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--num-layers", "4",
      "--global-batch-size", "1"], 2, "interleaved schedule needs a multiple of PP=2", "global batch"),
    (["--seq-length", "128"], 1, "--seq-length=128", "max_position_embeddings"),
    (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr=1.0", "0 <= min_lr <= lr"),
    (["--lr-warmup-iters", "10", "--train-iters", "10"], 1, "--lr-warmup-iters=10", "shorten the warmup"),
    (["--lr-decay-style", "WSD"], 1, "--lr-wsd-decay-iters=None", "anneal length"),
    (["--bf16", "--fp16"], 1, "both set", "choose one"),
    (["--fp8-format", "hybrid"], 1, "Transformer Engine", "--bf16"),
    (["--save-interval", "5"], 1, "has no --save directory", "--save DIR"),
    (["--ckpt-step", "5"], 1, "has no --load directory", "--load DIR"),
    (["--split", "100,0,0"], 1, "no data while --eval-iters > 0", "--eval-iters 0"),
    (["--split", "a,b"], 1, "--split='a,b'", "969,30,1"),
    (["--expert-model-parallel-size", "2"], 2, "needs routed layers", "EP=1"),
    (["--num-attention-heads", "3"], 1, "model: ", "Fix:"),
    (["--sequence-parallel"], 1, "sequence_parallel=True", "raise the tensor-parallel size"),
    (["--lr", "fast"], 1, "optimizer.lr='fast'", "expected float"),
    (["--lr-decay-style", "cosin"], 1, "invalid choice", "cosine"),
]


@pytest.mark.parametrize("extra,world,message,fix", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_config_fails_with_setting_and_fix(corpus, capsys, extra, world, message, fix):
    with pytest.raises((ConfigError, SystemExit)) as info:
        resolve([*base(corpus), *extra], world_size=world, check_files=False)
    text = str(info.value) + capsys.readouterr().err
    assert message in text and fix in text, text


def test_bad_config_file_and_keys(corpus, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve(["--config", str(tmp_path / "missing.yaml"), *base(corpus)])
    (tmp_path / "typo.yaml").write_text("optimiser:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="unknown section 'optimiser'.*'optimizer'"):
        resolve(["--config", str(tmp_path / "typo.yaml"), *base(corpus)])
    (tmp_path / "key.yaml").write_text("schedule:\n  train_iter: 5\n")
    with pytest.raises(ConfigError, match="unknown setting schedule.train_iter. Fix: did you mean schedule.train_it"):
        resolve(["--config", str(tmp_path / "key.yaml"), *base(corpus)])


def test_bad_data_surfaces_from_the_data_checks(corpus, tmp_path):
    tokenizer, data = corpus
    with pytest.raises(ConfigError, match="missing_prefix"):
        resolve(["--data-path", str(tmp_path / "missing_prefix"), *base(corpus)[2:]])
    with pytest.raises(ConfigError, match="vocab"):  # tokens up to 255 but a 128-token model
        resolve([*base(corpus), "--vocab-size", "128"])
    truncated = tmp_path / "cut"
    Path(f"{truncated}.idx").write_bytes(Path(f"{data}.idx").read_bytes())
    Path(f"{truncated}.bin").write_bytes(Path(f"{data}.bin").read_bytes()[:100])
    with pytest.raises(ConfigError, match="cut"):
        resolve(["--data-path", str(truncated), *base(corpus)[2:]])


LAYOUT_WORLD = {"cpu_demo": 1, "neon_125m": 8, "neon_1b": 16, "neon_7b": 32, "neon_flaming_moe_1b": 8}


@pytest.mark.parametrize("name", sorted(LAYOUT_WORLD))
def test_example_configs_resolve_at_their_layout(corpus, name):
    path = REPO / "examples" / "configs" / f"{name}.yaml"
    model_keys = set(yaml.safe_load(path.read_text()).get("model", {}))
    assert model_keys <= set(MODEL_FIELDS), f"unknown model settings: {sorted(model_keys - set(MODEL_FIELDS))}"
    tokenizer, data = corpus
    cfg = resolve(["--config", str(path), "--data-path", data, "--tokenizer-model", tokenizer, "--save", "ckpt"],
                  world_size=LAYOUT_WORLD[name], check_files=False)
    assert cfg.num_microbatches >= 1


def test_off_is_a_choice_not_a_yaml_boolean(corpus, tmp_path):
    """YAML 1.1 reads `off` as False; for choices that include 'off' it means 'off'."""
    cfg = resolve(base(corpus, "--diff-attention", "off", "--flaming-moe", "off"))
    assert cfg.model.diff_attention == "off" and cfg.model.flaming_moe == "off"
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  diff_attention: off\n")
    assert resolve(["--config", str(config), *base(corpus)]).model.diff_attention == "off"
    config.write_text("model:\n  diff_attention: yes\n")  # True is not a layout
    with pytest.raises(ConfigError, match="diff_attention"):
        resolve(["--config", str(config), *base(corpus)])


def test_text_flags_keep_what_was_typed(corpus):
    """YAML would read `1e3` as 1000.0, `0001` as 1 and `no` as False; a text setting keeps the text."""
    cfg = resolve(base(corpus, "--run-dir", "1e3", "--save", "0001", "--wandb-exp-name", "no",
                       "--data-cache-path", "null"), check_files=False)
    assert (cfg.logging.run_dir, cfg.checkpointing.save, cfg.logging.wandb_exp_name) == ("1e3", "0001", "no")
    assert cfg.data.data_cache_path is None
    assert cfg.optimizer.lr == 3e-4 and resolve(base(corpus, "--lr", "1e-3"), check_files=False).optimizer.lr == 1e-3
