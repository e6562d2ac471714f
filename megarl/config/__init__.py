"""Typed configuration: YAML recipes validated into frozen dataclasses (see docs/config.md).

Each component keeps its own frozen dataclass config next to its code; this package only loads,
validates, overrides and dumps them, and knows nothing about any particular trainer.
"""

from megarl.config.loader import (
    apply_overrides,
    config_to_yaml,
    dump_config,
    load_config,
    parse_override,
    parse_yaml,
    to_dict,
)

__all__ = [
    "apply_overrides",
    "config_to_yaml",
    "dump_config",
    "load_config",
    "parse_override",
    "parse_yaml",
    "to_dict",
]
