"""byztrain: Byzantine attacks on distributed training, BTARD-SGD and robust baselines."""

from byztrain.api import run
from byztrain.config import Config, ConfigError

__all__ = ["Config", "ConfigError", "run"]
__version__ = "0.1.0"
