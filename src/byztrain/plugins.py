"""Import every built-in plugin so the registries in `byztrain.registry` are full.

Each module registers what it defines when imported: the aggregation rules (`rules`), the trusted-server
defense (`defenses`), BTARD (`protocol.btard`), the attacks, datasets, models and splits (`tasks`).
The `byztrain` package imports this module, so any `import byztrain...` sees the full registries.
"""

from byztrain import attacks, defenses, rules  # noqa: F401  (they register)
from byztrain.protocol import btard  # noqa: F401
from byztrain.tasks import cifar, models, partition, resnet  # noqa: F401
