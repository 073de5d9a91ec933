"""The run's configuration: typed sections read from a YAML file, then Megatron-LM style flags.

    sections.py       the typed sections, Config, validate()        (what a setting is)
    model_section.py  the `model` section, generated from NeonConfig
    values.py         type-checking one value against its annotation
    parsing.py        flags (--help, aliases), YAML layering, resolve()
    recipes.py        the settings each Neon feature brings when it is on (feature_recipes())
    data_checks.py    the steps that read files: tokenizer vocabulary, data files
    serialization.py  --config files, config.yaml with origins, from_dict()

Precedence: built-in defaults < feature recipe < YAML file < command line. `resolve()` stops
every bad setting before anything is built with a ConfigError naming the setting and the fix,
and records where each value came from (Config.provenance; dump_yaml() shows it).
"""

from neon.training.config.model_section import (
    DERIVED_MODEL_FIELDS,
    MODEL_FIELDS,
    PARALLELISM_OWNED_FIELDS,
    ModelSection,
    representable,
)
from neon.training.config.parsing import (
    ALIASES,
    CommandLine,
    annotation,
    build_parser,
    flag_names,
    resolve,
    resolve_command_line,
)
from neon.training.config.recipes import feature_recipes
from neon.training.config.sections import (
    SECTIONS,
    CheckpointingConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    OptimizerSection,
    ParallelismConfig,
    ScheduleConfig,
    padded_vocab_size,
    validate,
)
from neon.training.config.serialization import dump_yaml, from_dict, load_yaml
from neon.training.config.values import is_bool

__all__ = [
    "ALIASES", "DERIVED_MODEL_FIELDS", "MODEL_FIELDS", "PARALLELISM_OWNED_FIELDS", "SECTIONS",
    "CheckpointingConfig", "CommandLine", "Config", "ConfigError", "DataConfig", "LoggingConfig",
    "ModelSection", "OptimizerSection", "ParallelismConfig", "ScheduleConfig", "annotation",
    "build_parser", "dump_yaml", "feature_recipes", "flag_names", "from_dict", "is_bool",
    "load_yaml", "padded_vocab_size", "representable", "resolve", "resolve_command_line", "validate",
]
