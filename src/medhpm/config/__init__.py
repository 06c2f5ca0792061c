"""Typed configs for every stage, resolved as: code defaults -> YAML file -> ``key=value`` overrides.

A YAML file is either a packaged name (``demo``, ``btcv_paper``, ... in ``medhpm/configs``) or a path.
Unknown keys and wrong types are errors that name the key and suggest the closest existing one;
impossible values (a width not divisible by the heads, an ROI not divisible by the patch, a mask ratio
outside (0, 1)) are errors that name the key and say what would be valid.

The package: :mod:`~medhpm.config.schema` (the dataclasses), :mod:`~medhpm.config.load` (defaults -> YAML ->
overrides), :mod:`~medhpm.config.validate` (values that cannot work, and the tables it needs),
:mod:`~medhpm.config.resume` (what a checkpoint depends on), :mod:`~medhpm.config.upgrade` (keys of earlier
versions). Everything is imported from ``medhpm.config``.
"""

from __future__ import annotations

from medhpm.config.schema import (
    CPU_MEMORY,
    Config,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    InferenceConfig,
    ModelConfig,
    PretrainConfig,
    RuntimeConfig,
    TrainingConfig,
)
from medhpm.config.upgrade import REMOVED_KEYS, RENAMED_KEYS
from medhpm.config.load import from_dict, load_config, packaged_configs, read_yaml, to_dict
from medhpm.config.resume import (
    CHECKPOINT_KEYS,
    STAGE_ONLY_KEYS,
    check_resume,
    checkpoint_keys,
    differences,
    get_key,
    resume_config,
    stored_config,
)
from medhpm.config.validate import (
    CLASS_PRESETS,
    COMPILE_MODES,
    ENCODER_PRESETS,
    METHODS,
    check_class_name,
    check_label_value,
    class_table,
    compile_mode,
    parse_class_list,
    validate,
)

__all__ = [
    "CHECKPOINT_KEYS",
    "CLASS_PRESETS",
    "COMPILE_MODES",
    "CPU_MEMORY",
    "Config",
    "ConfigError",
    "DataConfig",
    "ENCODER_PRESETS",
    "FinetuneConfig",
    "InferenceConfig",
    "METHODS",
    "ModelConfig",
    "PretrainConfig",
    "REMOVED_KEYS",
    "RENAMED_KEYS",
    "RuntimeConfig",
    "STAGE_ONLY_KEYS",
    "TrainingConfig",
    "check_class_name",
    "check_label_value",
    "check_resume",
    "checkpoint_keys",
    "class_table",
    "compile_mode",
    "differences",
    "from_dict",
    "get_key",
    "load_config",
    "packaged_configs",
    "parse_class_list",
    "read_yaml",
    "resume_config",
    "stored_config",
    "to_dict",
    "validate",
]
