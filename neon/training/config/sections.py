"""The run configuration's typed sections, the Config that holds them, and their validation.

    model          every representable NeonConfig field (model_section.py)
    parallelism    TP / PP / virtual PP / EP / sequence parallel / distributed optimizer
    data           data files, split, sequence length, tokenizer
    optimizer      Adam hyper-parameters, gradient clipping
    schedule       iterations, batch sizes, learning-rate schedule, evaluation cadence, seed
    checkpointing  save / load directories, interval, how many to keep
    logging        console interval, run directory, TensorBoard, wandb

The string literal after a field is its documentation; `--help` prints it. `validate()` checks
the settings and their combinations (no file is read: see data_checks.py); each failure is a
ConfigError whose message names the setting and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from neon.config import NeonConfig
from neon.errors import ConfigError
from neon.features import FEATURES
from neon.training.config.model_section import ModelSection


@dataclass
class ParallelismConfig:
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits attention heads and MLP width)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits the layers into stages)."""
    context_parallel_size: int = 1
    """Context-parallel size: splits every sequence over this many ranks (attention all-gathers
    keys/values; docs/training.md, "Context parallelism")."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per virtual stage: turns on the interleaved 1F1B schedule (needs PP > 1)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size of the routed layers (megatron experts, feature function banks)."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence over the TP group (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1, megatron's DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    distributed_timeout_minutes: float = 10
    """Timeout of torch.distributed collectives (every parallel group's): a rank that stops
    answering ends the job after this long, naming the collective (exit status 7)."""


@dataclass
class DataConfig:
    data_path: list = field(default_factory=list)
    """Data prefixes (path without .bin/.idx), optionally with blending weights: 0.7 a 0.3 b."""
    split: str = "969,30,1"
    """Train,valid,test proportions of each --data-path prefix."""
    train_data_path: list = field(default_factory=list)
    """The training split's own blend (as --data-path), used whole; instead of --data-path and --split."""
    valid_data_path: list = field(default_factory=list)
    """The validation split's own blend (with --train-data-path)."""
    test_data_path: list = field(default_factory=list)
    """The test split's own blend (with --train-data-path); its loss is logged after training."""
    mock_data: bool = False
    """Synthetic data (megatron-core's MockGPTDataset), no files: for throughput tests."""
    eod_mask_loss: bool = False
    """No loss where the input token is the end-of-document token."""
    reset_position_ids: bool = False
    """Position ids restart at 0 after each end-of-document token."""
    reset_attention_mask: bool = False
    """A token attends to no earlier document of its sample (every attention path, IO context windows)."""
    seq_length: int = 1024
    """Tokens per training sample."""
    tokenizer_model: Optional[str] = None
    """sentencepiece .model file, or a directory with a Hugging Face tokenizer.json; the model's
    vocab_size is derived from it unless set."""
    tokenizer_type: Optional[str] = None
    """Megatron-LM's tokenizer type (HuggingFaceTokenizer, GPTSentencePieceTokenizer, ...); default:
    what --tokenizer-model is."""
    make_vocab_size_divisible_by: int = 128
    """Pad the tokenizer's vocabulary to a multiple of this times TP (as Megatron-LM)."""
    data_cache_path: Optional[str] = None
    """Where megatron's dataset index caches go (default: next to the data)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 loads in the training process)."""


@dataclass
class OptimizerSection:
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of decay."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""


@dataclass
class ScheduleConfig:
    train_iters: int = 1000
    """Optimizer steps of the run."""
    micro_batch_size: int = 1
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step (micro batches are accumulated to reach it)."""
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    lr_decay_iters: Optional[int] = None
    """Iterations to decay over (default: train_iters)."""
    lr_warmup_iters: int = 0
    """Linear warmup from lr_warmup_init to lr."""
    lr_warmup_init: float = 0.0
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """Shape of the final anneal of the WSD schedule."""
    lr_wsd_decay_iters: Optional[int] = None
    """Length of the WSD anneal (required with lr_decay_style=WSD)."""
    eval_interval: int = 100
    """Evaluate on the validation split every this many iterations (and at the end)."""
    eval_iters: int = 10
    """Global batches per evaluation (always the same validation samples)."""
    eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks evaluated during training (their scores logged like the loss)."""
    eval_tasks_interval: Optional[int] = None
    """Evaluate --eval-tasks every this many iterations and at the end (default: --eval-interval)."""
    eval_tasks_include_path: Optional[str] = None
    """A folder of lm-eval task YAMLs besides lm-eval's registry."""
    eval_tasks_limit: Optional[int] = None
    """Documents per task at each evaluation (default: all)."""
    eval_tasks_num_fewshot: Optional[int] = None
    """Few-shot examples per document (default: each task's)."""
    seed: int = 1234
    """Seed of weight init, dropout and data shuffling."""
    exit_interval: Optional[int] = None
    """Save and exit cleanly once the iteration is a multiple of this."""
    skip_train: bool = False
    """Do not train: load (--load), evaluate on the validation split, exit."""
    iterations_to_skip: list[int] = field(default_factory=list)
    """A YAML list, '[1234, 1240]': iterations (as logged) whose batch is drawn and dropped, with no
    forward, backward, update or LR step; the iteration and data position advance."""


@dataclass
class CheckpointingConfig:
    save: Optional[str] = None
    """Directory for checkpoints (iter_XXXXXXX dirs + latest_checkpointed_iteration.txt)."""
    load: Optional[str] = None
    """Directory to resume from (its latest checkpoint); missing or empty starts from scratch."""
    save_interval: Optional[int] = None
    """Save every this many iterations (and at the end of training when save is set)."""
    ckpt_step: Optional[int] = None
    """Load this iteration from --load instead of the latest one."""
    ckpt_keep_last: int = 3
    """Keep this many most recent checkpoints (0 keeps all)."""
    no_load_optim: bool = False
    """Load weights only, not optimizer and scheduler state."""
    no_load_rng: bool = False
    """Do not restore the RNG states."""
    override_opt_param_scheduler: bool = False
    """On resume, take lr, min_lr, warmup, decay and weight decay from this run's settings, not
    the checkpoint's (which win otherwise, so a new --lr alone is ignored)."""
    exit_signal_handler: bool = True
    """On SIGTERM / SIGUSR1: finish the step, save, exit cleanly (Slurm's pre-emption warning)."""
    async_save: bool = False
    """Write checkpoints from a forked process while training goes on; each is committed (marker
    moved) at the first step after its files are written, and finished before the run exits."""
    save_failure: Literal["stop", "continue"] = "stop"
    """A save that fails for the machine (full or read-only disk): stop with the named error
    (exit status 7), or report it and go on, trying again at the next save."""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    """Print a console line and a metrics.jsonl record every this many iterations."""
    run_dir: Optional[str] = None
    """Where metrics.jsonl and config.yaml go (default: the save directory, else runs/neon)."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (off when unset)."""
    wandb_project: Optional[str] = None
    """Log to this wandb project (off when unset); WANDB_MODE=offline works; key from WANDB_API_KEY."""
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    """wandb's local directory (default: <run_dir>/wandb)."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device, for the MFU estimate (default: known GPUs, else none)."""
    progress_bar: bool = True
    """Show a tqdm bar with ETA when stdout is a terminal."""


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "parallelism": ParallelismConfig,
    "data": DataConfig,
    "optimizer": OptimizerSection,
    "schedule": ScheduleConfig,
    "checkpointing": CheckpointingConfig,
    "logging": LoggingConfig,
}

DEFAULT = "default"  # the origin of a value nobody set


@dataclass
class Config:
    model: Any = field(default_factory=ModelSection)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    world_size: int = 1
    """Processes in the job (WORLD_SIZE from torchrun); not a setting."""
    provenance: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    """{"section.field": origin} of every value someone set: "recipe:<feature>", "config file",
    "command line", "tokenizer" (vocab_size), "saved config" (from_dict). Unlisted: "default"."""

    def origin(self, key: str) -> str:
        """Where the value of `key` ("section.field") came from."""
        return self.provenance.get(key, DEFAULT)

    def set(self, key: str, value, origin: str) -> None:
        """Set `key` ("section.field") to an already type-checked value and record its origin."""
        section, name = key.split(".", 1)
        setattr(getattr(self, section), name, value)
        self.provenance[key] = origin

    @property
    def data_parallel_size(self) -> int:
        p = self.parallelism
        return self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                   * p.context_parallel_size)

    @property
    def num_microbatches(self) -> int:
        s = self.schedule
        return s.global_batch_size // (s.micro_batch_size * self.data_parallel_size)

    @property
    def virtual_pipeline_size(self) -> Optional[int]:
        per_stage = self.parallelism.num_layers_per_virtual_pipeline_stage
        if per_stage is None:
            return None
        return self.model.num_layers // (self.parallelism.pipeline_model_parallel_size * per_stage)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def neon_config(self, **runtime) -> NeonConfig:
        """The model's NeonConfig with this run's parallel layout and precision."""
        import torch

        p = self.parallelism
        values = dataclasses.asdict(self.model)
        dtype = torch.bfloat16 if values["bf16"] else torch.float16 if values["fp16"] else torch.float32
        return NeonConfig(
            **values,
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
            expert_tensor_parallel_size=1,  # routed functions are never split by TP
            params_dtype=dtype,
            pipeline_dtype=dtype,
            **runtime,
        )


def padded_vocab_size(cfg: Config, vocab: int) -> int:
    """The tokenizer's vocabulary rounded up to make_vocab_size_divisible_by x TP (Megatron-LM)."""
    multiple = cfg.data.make_vocab_size_divisible_by * cfg.parallelism.tensor_model_parallel_size
    return -(-vocab // multiple) * multiple


# --- validation -------------------------------------------------------------------------------


def fail(setting: str, value, problem: str, fix: str):
    raise ConfigError(f"{setting}={value!r}: {problem}. Fix: {fix}.")


def validate(cfg: Config) -> None:
    """Check every setting and combination that needs no file; raise ConfigError on the first."""
    _check_inherited(cfg.model)
    _check_positive(cfg)
    _check_layout(cfg)
    _check_virtual_pipeline(cfg)
    _check_optimizer_and_schedule(cfg)
    _check_precision(cfg.model)
    _check_checkpointing(cfg.checkpointing)
    _check_data_settings(cfg.data, cfg.schedule)
    _check_model(cfg)


def _check_inherited(m) -> None:
    """No megatron-core field Neon does not build is set (neon/training/config/inherited.py)."""
    from neon.training.config.inherited import refusal
    from neon.training.config.model_section import MODEL_FIELDS

    for name, (_, default) in MODEL_FIELDS.items():
        refused = refusal(name)
        if refused is not None and getattr(m, name) != default:
            reason, fix = refused
            fail("--" + name.replace("_", "-"), getattr(m, name), f"is a megatron-core setting Neon does not build: "
                 f"{reason}", fix)


def _check_positive(cfg: Config) -> None:
    p, s = cfg.parallelism, cfg.schedule
    for name, value in (("tensor_model_parallel_size", p.tensor_model_parallel_size),
                        ("pipeline_model_parallel_size", p.pipeline_model_parallel_size),
                        ("context_parallel_size", p.context_parallel_size),
                        ("expert_model_parallel_size", p.expert_model_parallel_size),
                        ("micro_batch_size", s.micro_batch_size), ("global_batch_size", s.global_batch_size),
                        ("train_iters", s.train_iters), ("seq_length", cfg.data.seq_length),
                        ("log_interval", cfg.logging.log_interval)):
        if value < 1:
            fail(f"--{name.replace('_', '-')}", value, "must be at least 1", "give a positive integer")


def _check_layout(cfg: Config) -> None:
    p, s = cfg.parallelism, cfg.schedule
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    cp = p.context_parallel_size
    if cfg.world_size % (tp * pp * cp):
        fail("--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size",
             tp * pp * cp, f"does not divide the {cfg.world_size} processes", "launch a multiple of TP x PP x CP "
             "processes (torchrun --nproc-per-node) or change the layout")
    if cfg.data.seq_length % (2 * cp):
        fail("--seq-length", cfg.data.seq_length, f"is not divisible by 2 x context_parallel_size = {2 * cp} "
             "(each context-parallel rank holds two chunks of every sequence)",
             f"use a sequence length that is a multiple of {2 * cp}")
    dp = cfg.data_parallel_size
    if (dp * cp * tp) % ep:
        fail("--expert-model-parallel-size", ep, f"does not divide data-parallel x context-parallel x "
             f"tensor-parallel = {dp * cp * tp}", "use an expert-parallel size that divides DP x CP x TP")
    experts = cfg.model.num_moe_experts
    routed = [f"--{f.name.replace('_', '-')}" for f in FEATURES.values() if f.uses_expert_parallelism(cfg.model)]
    if ep > 1 and not (experts or any(f.enabled(cfg.model) and f.uses_expert_parallelism(cfg.model)
                                      for f in FEATURES.values())):
        fail("--expert-model-parallel-size", ep, "needs routed layers (megatron experts or a feature that routes "
             "tokens to functions)", f"set {' / '.join(['--num-experts', *routed])}, or use EP=1")
    if experts and experts % ep:
        fail("--num-experts", experts, f"is not divisible by expert_model_parallel_size={ep}",
             "use a number of experts that is a multiple of EP")
    if s.global_batch_size % (s.micro_batch_size * dp):
        fail("--global-batch-size", s.global_batch_size,
             f"is not divisible by micro_batch_size x data-parallel size = {s.micro_batch_size} x {dp}",
             f"use a multiple of {s.micro_batch_size * dp}")


def _check_virtual_pipeline(cfg: Config) -> None:
    per, pp = cfg.parallelism.num_layers_per_virtual_pipeline_stage, cfg.parallelism.pipeline_model_parallel_size
    if per is None:
        return
    layers = cfg.model.num_layers
    if pp < 2:
        fail("--num-layers-per-virtual-pipeline-stage", per, "needs pipeline parallelism",
             "set --pipeline-model-parallel-size > 1 or drop the flag")
    if per < 1 or layers % (pp * per):
        fail("--num-layers-per-virtual-pipeline-stage", per,
             f"does not divide num_layers={layers} over {pp} pipeline stages", f"use a divisor of {layers // pp}")
    if layers // (pp * per) < 2:
        fail("--num-layers-per-virtual-pipeline-stage", per,
             "gives one virtual stage per pipeline rank (no interleaving)", "use a smaller value")
    m = cfg.num_microbatches
    if m < pp or m % pp:
        fail("--global-batch-size", cfg.schedule.global_batch_size,
             f"gives {m} micro-batches; the interleaved schedule needs a multiple of PP={pp}",
             f"use a global batch of {pp} x micro_batch_size x data-parallel size (or a multiple)")


def _check_optimizer_and_schedule(cfg: Config) -> None:
    o, s = cfg.optimizer, cfg.schedule
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        fail("--min-lr", o.min_lr, f"must lie in [0, lr={o.lr}] with lr > 0", "set 0 <= min_lr <= lr")
    if o.clip_grad < 0:
        fail("--clip-grad", o.clip_grad, "must be >= 0", "use 0 to turn clipping off")
    if o.weight_decay < 0:
        fail("--weight-decay", o.weight_decay, "must be >= 0", "use 0 for none")
    decay_iters = s.lr_decay_iters or s.train_iters
    if s.lr_warmup_iters < 0 or s.lr_warmup_iters >= decay_iters:
        fail("--lr-warmup-iters", s.lr_warmup_iters, f"must be in [0, lr_decay_iters={decay_iters})",
             "shorten the warmup or lengthen --lr-decay-iters / --train-iters")
    if s.lr_warmup_init > o.lr:
        fail("--lr-warmup-init", s.lr_warmup_init, f"exceeds lr={o.lr}", "start the warmup below the peak")
    if s.lr_decay_style == "WSD":
        if not s.lr_wsd_decay_iters or s.lr_wsd_decay_iters > decay_iters - s.lr_warmup_iters:
            fail("--lr-wsd-decay-iters", s.lr_wsd_decay_iters,
                 f"must be set and fit after the warmup within lr_decay_iters={decay_iters}",
                 "give the anneal length, e.g. 10-20% of --train-iters")
    if s.eval_interval < 1 or s.eval_iters < 0:
        fail("--eval-interval/--eval-iters", (s.eval_interval, s.eval_iters), "must be >= 1 / >= 0",
             "use --eval-iters 0 to turn evaluation off")
    for name in ("eval_tasks_interval", "eval_tasks_limit"):
        if getattr(s, name) is not None and getattr(s, name) < 1:
            fail("--" + name.replace("_", "-"), getattr(s, name), "must be >= 1", "give a positive number or leave "
                 "it unset")


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


def _check_precision(m) -> None:
    if m.bf16 and m.fp16:
        fail("--bf16/--fp16", True, "both set", "choose one precision")
    if m.fp8:
        if not te_available():
            fail("--fp8-format", m.fp8, "needs Transformer Engine, which is not importable here",
                 "drop --fp8-format (use --bf16) or run in an NGC container with TE")


def _check_checkpointing(c: CheckpointingConfig) -> None:
    if c.save_interval is not None and c.save_interval < 1:
        fail("--save-interval", c.save_interval, "must be >= 1", "give a positive interval or leave it unset")
    if c.save_interval and not c.save:
        fail("--save-interval", c.save_interval, "has no --save directory", "add --save DIR")
    if c.ckpt_step is not None and not c.load:
        fail("--ckpt-step", c.ckpt_step, "has no --load directory", "add --load DIR")
    if c.ckpt_keep_last < 0:
        fail("--ckpt-keep-last", c.ckpt_keep_last, "must be >= 0", "use 0 to keep all checkpoints")
    if c.load and Path(c.load).exists() and not Path(c.load).is_dir():
        fail("--load", c.load, "is a file, not a checkpoint directory", "give the directory passed to --save")


def _check_data_settings(d: DataConfig, s: ScheduleConfig) -> None:
    sources = [name for name, given in (("--data-path", d.data_path), ("--train-data-path", d.train_data_path),
                                        ("--mock-data", d.mock_data)) if given]
    for name, given in (("--valid-data-path", d.valid_data_path), ("--test-data-path", d.test_data_path)):
        if given and not d.train_data_path:
            fail(name, given, "needs --train-data-path", "give the training blend with --train-data-path "
                 "(the per-split paths replace --data-path and --split)")
    if len(sources) > 1:
        fail(sources[1], getattr(d, sources[1][2:].replace("-", "_")), f"is given with {sources[0]}",
             "use one data source: --data-path with --split, or --train-data-path (with --valid-data-path and "
             "--test-data-path), or --mock-data")
    if not sources:
        fail("--data-path", d.data_path, "is empty", "give the prefix of a .bin/.idx pair made by "
             "tools/preprocess_data.py (or --train-data-path per split, or --mock-data; `make demo` makes one)")
    try:
        parts = [float(x) for x in d.split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2, 3) or any(x < 0 for x in parts) or sum(parts) <= 0:
        fail("--split", d.split, "is not a train,valid,test proportion", "use e.g. 969,30,1")
    parts += [0.0] * (3 - len(parts))
    if d.train_data_path:
        if s.eval_iters > 0 and not d.valid_data_path:
            fail("--valid-data-path", d.valid_data_path, "is not given while --eval-iters > 0",
                 "give the validation blend or set --eval-iters 0")
    elif s.eval_iters > 0 and parts[1] == 0:
        fail("--split", d.split, "gives the validation set no data while --eval-iters > 0",
             "give the validation split a share (e.g. 98,2,0) or set --eval-iters 0")
    if d.reset_attention_mask and te_available():
        fail("--reset-attention-mask", True, "needs Neon's own core attention, and with Transformer Engine installed "
             "the layers use TE's, which takes no document ids", "pack documents without it, or run where TE is "
             "not installed")
    if s.eval_tasks and not d.tokenizer_model:
        fail("--eval-tasks", s.eval_tasks, "needs the tokenizer to encode the tasks' text",
             "give --tokenizer-model (with --mock-data too)")
    if not d.tokenizer_model and not d.mock_data:
        fail("--tokenizer-model", d.tokenizer_model, "is not set", "give the tokenizer the data was tokenized "
             "with (a sentencepiece .model, or a directory with a Hugging Face tokenizer.json)")


def _check_model(cfg: Config) -> None:
    """The sequence fits the positions; NeonConfig's and megatron-core's own checks (run by
    building the cheap config object)."""
    if cfg.model.max_position_embeddings < cfg.data.seq_length:
        fail("--seq-length", cfg.data.seq_length,
             f"exceeds max_position_embeddings={cfg.model.max_position_embeddings}",
             "raise --max-position-embeddings or shorten the sequences")
    try:
        cfg.neon_config()
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from None
    except (AssertionError, ValueError) as e:  # megatron-core's own TransformerConfig checks
        raise ConfigError(f"model: megatron-core rejects the model settings: {e}") from None
