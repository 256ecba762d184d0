"""Experiments: grid sweeps (`byztrain sweep`) and reports (`byztrain report`). See docs/experiments.md.

`run_sweep` is `byztrain.experiments.sweep.sweep` (re-exported under another name so that the submodule
`byztrain.experiments.sweep` is not shadowed by the function).
"""

from byztrain.experiments.run_report import make_report
from byztrain.experiments.sweep import expand_grid, name_points, plan
from byztrain.experiments.sweep import sweep as run_sweep

__all__ = ["expand_grid", "make_report", "name_points", "plan", "run_sweep"]
