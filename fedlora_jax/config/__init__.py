"""The run's configuration: pure data and validation, importing no implementation.

run_config.py  RunConfig (frozen), the presets, load_config, config_diff
sections.py    one frozen dataclass per YAML section, with its checks
checks.py      checks across sections
yaml_io.py     YAML reading: duplicate keys, --set overrides, type coercion
presets/       default.yaml, tiny.yaml, paper.yaml (package data)

`from fedlora_jax.config import load_config, RunConfig` is the short path."""

from .run_config import RunConfig, config_diff, load_config, preset_names, tiny_shape_keys

__all__ = ["RunConfig", "config_diff", "load_config", "preset_names", "tiny_shape_keys"]
