"""byztrain: Byzantine attacks on distributed training, BTARD-SGD and robust baselines."""

from byztrain import plugins  # noqa: F401  (fills the registries before any config is validated)
from byztrain.api import run
from byztrain.config import Config, ConfigError

__all__ = ["Config", "ConfigError", "run"]
__version__ = "0.1.0"
