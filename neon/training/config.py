"""The run's configuration: typed sections read from a YAML file, then Megatron-LM style flags.

    model          every representable NeonConfig field (generated from the dataclass, so each
                   Neon feature added to NeonConfig is configurable without touching this file)
    parallelism    TP / PP / virtual PP / EP / sequence parallel / distributed optimizer
    data           data files, split, sequence length, tokenizer
    optimizer      Adam hyper-parameters, gradient clipping
    schedule       iterations, batch sizes, learning-rate schedule, evaluation cadence, seed
    checkpointing  save / load directories, interval, how many to keep
    logging        console interval, run directory, TensorBoard, wandb

Precedence: dataclass defaults < feature defaults (FEATURE_DEFAULTS) < YAML file < command line.
`resolve()` validates every combination it can before anything is built and raises
`ConfigError` naming the setting and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from neon.config import NeonConfig, NeonConfigError
from neon.ngpt import ngpt_optimizer_defaults


class ConfigError(ValueError):
    """A setting (or combination) the run cannot use; the message names it and the fix."""


# --- sections ---------------------------------------------------------------------------------

# NeonConfig fields that the parallelism section owns (copied into NeonConfig when it is built),
# and ones derived from other settings.
PARALLEL_FIELDS = {
    "tensor_model_parallel_size": "tensor_model_parallel_size",
    "pipeline_model_parallel_size": "pipeline_model_parallel_size",
    "expert_model_parallel_size": "expert_model_parallel_size",
    "sequence_parallel": "sequence_parallel",
}
DERIVED_MODEL_FIELDS = {"virtual_pipeline_model_parallel_size", "context_parallel_size",
                        "expert_tensor_parallel_size", "params_dtype", "pipeline_dtype",
                        "window_size"}


@dataclass
class ParallelismConfig:
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits attention heads and MLP width)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits the layers into stages)."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per virtual stage: turns on the interleaved 1F1B schedule (needs PP > 1)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size for FlamingMoE layers."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence over the TP group (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1, megatron's DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    distributed_timeout_minutes: int = 10
    """Timeout of torch.distributed collectives."""


@dataclass
class DataConfig:
    data_path: list = field(default_factory=list)
    """Data prefixes (path without .bin/.idx), optionally with blending weights: 0.7 a 0.3 b."""
    split: str = "969,30,1"
    """Train,valid,test proportions of each data prefix."""
    seq_length: int = 1024
    """Tokens per training sample."""
    tokenizer_model: Optional[str] = None
    """sentencepiece model file; the model's vocab_size is derived from it unless set."""
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


LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


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
    seed: int = 1234
    """Seed of weight init, dropout and data shuffling."""
    exit_interval: Optional[int] = None
    """Save and exit cleanly once the iteration is a multiple of this."""
    skip_train: bool = False
    """Do not train: load (--load), evaluate on the validation split, exit."""


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
    exit_signal_handler: bool = True
    """On SIGTERM / SIGUSR1: finish the step, save, exit cleanly (Slurm's pre-emption warning)."""


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


# --- the model section: generated from NeonConfig ---------------------------------------------

_SCALARS = (bool, int, float, str)


def _representable(tp) -> bool:
    """Can a value of this annotation be written in YAML / on a command line?"""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS or tp is type(None):
        return True
    if origin is Literal:
        return all(isinstance(a, _SCALARS) for a in args)
    if origin in (Union, types.UnionType):
        return all(_representable(a) for a in args)
    if origin in (list, tuple, list, tuple):
        return all(_representable(a) for a in args if a is not Ellipsis)
    return False


def _model_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(NeonConfig)
    out = []
    for f in dataclasses.fields(NeonConfig):
        if not f.init or f.name in PARALLEL_FIELDS or f.name in DERIVED_MODEL_FIELDS:
            continue
        tp = hints.get(f.name, f.type)
        if not _representable(tp):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue  # required fields (num_layers, ...) are given defaults below
        out.append((f.name, tp, default))
    own = NeonConfig.__annotations__  # Mistral and Neon settings first, then megatron-core's
    return sorted(out, key=lambda item: item[0] not in own)


REQUIRED_MODEL_DEFAULTS = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4}
MODEL_FIELDS = {name: (tp, REQUIRED_MODEL_DEFAULTS.get(name, d)) for name, tp, d in _model_fields()}
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [(name, tp, field(default_factory=(lambda d=d: d))) for name, (tp, d) in MODEL_FIELDS.items()],
)
ModelSection.__doc__ = "Every NeonConfig field that a YAML file or a flag can express."

SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "parallelism": ParallelismConfig,
    "data": DataConfig,
    "optimizer": OptimizerSection,
    "schedule": ScheduleConfig,
    "checkpointing": CheckpointingConfig,
    "logging": LoggingConfig,
}

# Megatron-LM flag names that differ from "--" + field name with dashes.
ALIASES = {
    "rope_theta": ["--rotary-base"],
    "num_moe_experts": ["--num-experts"],
    "layernorm_epsilon": ["--norm-epsilon"],
    "fp8": ["--fp8-format"],
    "sliding_window": ["--window-size"],
}

# Defaults that a Neon feature brings when it is on (applied below the YAML file and flags):
# {model field: {"section.field": value}}. The nGPT work owns its entry.
FEATURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "ngpt": ngpt_optimizer_defaults(),  # weight decay 0, no warmup (neon/ngpt.py)
}


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

    @property
    def data_parallel_size(self) -> int:
        p = self.parallelism
        return self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

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
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            **runtime,
        )


# --- parsing ---------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _annotation(cls, name):
    if cls is ModelSection:
        return MODEL_FIELDS[name][0]
    return typing.get_type_hints(cls)[name]


def _is_bool(tp) -> bool:
    return tp is bool or tp == Optional[bool]


def _check_type(where: str, value, tp):
    """Coerce/validate a YAML or command-line value against a dataclass annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for alt in args:
            try:
                return _check_type(where, value, alt)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}. "
                          f"Fix: give a value of that type.")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if isinstance(value, bool) and {"off", "on"} & set(args):
            # YAML 1.1 reads off/on/no/yes as booleans: `diff_attention: off` means "off"
            value = {False: "off", True: "on"}[value]
        if value in args:
            return value
        raise ConfigError(f"{where}={value!r} is not a valid choice. Fix: use one of {list(args)}.")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin in (list, list):
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else typing.Any
            return [_check_type(f"{where}[{i}]", v, inner) for i, v in enumerate(value)]
    elif origin in (tuple, tuple):
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_check_type(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    raise ConfigError(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}. "
                      f"Fix: give a value of that type.")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_neon.py",
        usage="torchrun [...] pretrain_neon.py [--config FILE.yaml] [--flag VALUE ...]",
        description="Pretrain a Neon model with megatron-core. Settings come from --config (YAML, "
                    "sections as below) and these flags (Megatron-LM names); flags win.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file with sections " + ", ".join(SECTIONS))
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip().split("\n")[0])
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = _annotation(cls, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flags = [_flag(f.name)] + (ALIASES.get(f.name, []) if section == "model" else [])
            help_text = f"{docs.get(f.name, '')} [{section}.{f.name}, default: {default!r}]".strip()
            dest = f"{section}.{f.name}"
            if _is_bool(tp):
                group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction,
                                   help=help_text)
            elif section == "data" and f.name == "data_path":
                group.add_argument(*flags, dest=dest, nargs="+", metavar="[WEIGHT] PREFIX",
                                   help=help_text)
            else:
                choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
                group.add_argument(*flags, dest=dest, metavar=_metavar(tp), choices=choices,
                                   help=help_text)
    return parser


def _metavar(tp) -> str:
    base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return _type_name(base[0]).upper() if len(base) == 1 else "VALUE"


@functools.cache
def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a section dataclass."""
    import ast
    import inspect

    if cls is ModelSection:
        cls = NeonConfig
    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for prev, node in zip(body, body[1:]):
            if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                    and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                docs[prev.target.id] = " ".join(node.value.value.split()).replace("%", "%%")[:200]
    return docs


def _parse_cli_value(raw: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file. Fix: give the path of a YAML file "
                          f"(see examples/configs/).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r}: expected sections {list(SECTIONS)} at the top level")
    return data


def _apply(cfg: Config, section: str, name: str, value, origin: str) -> None:
    cls = SECTIONS[section]
    names = [f.name for f in dataclasses.fields(cls)]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {section}.{close[0]}?" if close else f"see `pretrain_neon.py --help` ({section})"
        raise ConfigError(f"{origin}: unknown setting {section}.{name}. Fix: {hint}")
    value = _check_type(f"{section}.{name}", value, _annotation(cls, name))
    setattr(getattr(cfg, section), name, value)


def resolve(argv: Optional[list[str]] = None, world_size: Optional[int] = None,
            check_files: bool = True) -> Config:
    """Defaults < feature defaults < YAML < flags; then validate. Nothing is built here."""
    args = vars(build_parser().parse_args(argv))
    yaml_data = load_yaml(args.pop("config")) if "config" in args else {}
    explicit = set()
    layered: list[tuple[str, str, Any, str]] = []  # (section, name, value, origin)
    for section, values in yaml_data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            raise ConfigError(f"config file: unknown section {section!r}. Fix: use "
                              f"{close[0] if close else ' / '.join(SECTIONS)!r}.")
        for name, value in (values or {}).items():
            layered.append((section, name, value, "config file"))
    for dest, raw in args.items():
        section, name = dest.split(".", 1)
        value = raw if isinstance(raw, bool) else (
            _parse_data_path(raw) if name == "data_path" else _parse_cli_value(raw))
        layered.append((section, name, value, f"{_flag(name)}"))
    cfg = Config(world_size=world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1)))
    for section, name, value, origin in layered:
        _apply(cfg, section, name, value, origin)
        explicit.add(f"{section}.{name}")
    for feature, defaults in FEATURE_DEFAULTS.items():
        if getattr(cfg.model, feature, None) not in (None, False, "off"):
            for key, value in defaults.items():
                if key not in explicit:
                    section, name = key.split(".", 1)
                    setattr(getattr(cfg, section), name, value)
    if cfg.data.tokenizer_model and "model.vocab_size" not in explicit:
        cfg.model.vocab_size = padded_vocab_size(cfg, _tokenizer_vocab_size(cfg.data.tokenizer_model))
    validate(cfg, check_files=check_files)
    return cfg


def _parse_data_path(tokens: list[str]) -> list[str]:
    return [str(t) for t in tokens]


def _tokenizer_vocab_size(path: str) -> int:
    if not Path(path).is_file():
        raise ConfigError(f"--tokenizer-model {path!r}: no such file. Fix: give a sentencepiece .model file "
                          f"(tools/train_tokenizer.py makes one).")
    from neon.data import NeonTokenizer

    return NeonTokenizer(path).vocab_size


def padded_vocab_size(cfg: Config, vocab: int) -> int:
    multiple = cfg.data.make_vocab_size_divisible_by * cfg.parallelism.tensor_model_parallel_size
    return -(-vocab // multiple) * multiple


def validate(cfg: Config, check_files: bool = True) -> None:
    def fail(setting, value, problem, fix):
        raise ConfigError(f"{setting}={value!r}: {problem}. Fix: {fix}.")

    p, s, d, o, c, lg = cfg.parallelism, cfg.schedule, cfg.data, cfg.optimizer, cfg.checkpointing, cfg.logging
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("expert_model_parallel_size", ep), ("micro_batch_size", s.micro_batch_size),
                        ("global_batch_size", s.global_batch_size), ("train_iters", s.train_iters),
                        ("seq_length", d.seq_length), ("log_interval", lg.log_interval)):
        if value < 1:
            fail(f"--{name.replace('_', '-')}", value, "must be at least 1", "give a positive integer")
    if cfg.world_size % (tp * pp):
        fail("--tensor-model-parallel-size x --pipeline-model-parallel-size", tp * pp,
             f"does not divide the {cfg.world_size} processes", "launch a multiple of TP x PP processes "
             "(torchrun --nproc-per-node) or change the layout")
    dp = cfg.data_parallel_size
    if (dp * tp) % ep:
        fail("--expert-model-parallel-size", ep, f"does not divide data-parallel x tensor-parallel = {dp * tp}",
             "use an expert-parallel size that divides DP x TP")
    routed = cfg.model.num_moe_experts or getattr(cfg.model, "flaming_moe", "off") != "off"
    if ep > 1 and not routed:
        fail("--expert-model-parallel-size", ep, "needs routed layers (experts or FlamingMoE)",
             "set --num-experts / --flaming-moe, or use EP=1")
    if cfg.model.num_moe_experts and cfg.model.num_moe_experts % ep:
        fail("--num-experts", cfg.model.num_moe_experts, f"is not divisible by expert_model_parallel_size={ep}",
             "use a number of experts that is a multiple of EP")
    if s.global_batch_size % (s.micro_batch_size * dp):
        fail("--global-batch-size", s.global_batch_size,
             f"is not divisible by micro_batch_size x data-parallel size = {s.micro_batch_size} x {dp}",
             f"use a multiple of {s.micro_batch_size * dp}")
    if p.num_layers_per_virtual_pipeline_stage is not None:
        per = p.num_layers_per_virtual_pipeline_stage
        if pp < 2:
            fail("--num-layers-per-virtual-pipeline-stage", per, "needs pipeline parallelism",
                 "set --pipeline-model-parallel-size > 1 or drop the flag")
        if per < 1 or cfg.model.num_layers % (pp * per):
            fail("--num-layers-per-virtual-pipeline-stage", per,
                 f"does not divide num_layers={cfg.model.num_layers} over {pp} pipeline stages",
                 f"use a divisor of {cfg.model.num_layers // pp}")
        if cfg.model.num_layers // (pp * per) < 2:
            fail("--num-layers-per-virtual-pipeline-stage", per,
                 "gives one virtual stage per pipeline rank (no interleaving)", "use a smaller value")
        m = cfg.num_microbatches
        if m < pp or m % pp:
            fail("--global-batch-size", s.global_batch_size,
                 f"gives {m} micro-batches; the interleaved schedule needs a multiple of PP={pp}",
                 f"use a global batch of {pp} x micro_batch_size x data-parallel size (or a multiple)")
    if cfg.model.max_position_embeddings < d.seq_length:
        fail("--seq-length", d.seq_length, f"exceeds max_position_embeddings={cfg.model.max_position_embeddings}",
             "raise --max-position-embeddings or shorten the sequences")
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
    m = cfg.model
    if m.bf16 and m.fp16:
        fail("--bf16/--fp16", True, "both set", "choose one precision")
    if m.fp8:
        try:
            import transformer_engine  # noqa: F401
        except (ImportError, RuntimeError):
            fail("--fp8-format", m.fp8, "needs Transformer Engine, which is not importable here",
                 "drop --fp8-format (use --bf16) or run in an NGC container with TE")
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
    if not d.data_path:
        fail("--data-path", d.data_path, "is empty", "give the prefix of a .bin/.idx pair made by "
             "tools/preprocess_data.py (or run `make demo` for a ready-made one)")
    split = d.split.replace("/", ",").split(",")
    try:
        parts = [float(x) for x in split]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2, 3) or any(x < 0 for x in parts) or sum(parts) <= 0:
        fail("--split", d.split, "is not a train,valid,test proportion", "use e.g. 969,30,1")
    parts += [0.0] * (3 - len(parts))
    if s.eval_iters > 0 and parts[1] == 0:
        fail("--split", d.split, "gives the validation set no data while --eval-iters > 0",
             "give the validation split a share (e.g. 98,2,0) or set --eval-iters 0")
    if not d.tokenizer_model:
        fail("--tokenizer-model", d.tokenizer_model, "is not set", "give the sentencepiece model the data "
             "was tokenized with")
    try:
        neon_config = cfg.neon_config()
    except NeonConfigError as e:
        raise ConfigError(f"model: {e}") from None
    except (AssertionError, ValueError) as e:  # megatron-core's own TransformerConfig checks
        raise ConfigError(f"model: megatron-core rejects the model settings: {e}") from None
    if check_files:
        from neon.data import DataError, check_data_files

        try:
            check_data_files(d.data_path, neon_config.vocab_size)
        except DataError as e:
            raise ConfigError(f"--data-path: {e}") from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def from_dict(values: dict, world_size: int = 1) -> Config:
    """A Config from a resolved dict (as saved in a checkpoint); unknown keys are ignored."""
    cfg = Config(world_size=world_size)
    for section, cls in SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        for name, value in (values.get(section) or {}).items():
            if name in names:
                setattr(getattr(cfg, section), name, value)
    return cfg
