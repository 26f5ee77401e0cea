"""Shared infrastructure: registries, configs, run directories, logging, distributed helpers."""

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

__all__ = ["Registry", "SlimkitError"]
