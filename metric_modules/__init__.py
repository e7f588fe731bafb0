"""draftsmith's acceptance metrics as local Hugging Face `evaluate` modules, one folder each
(`<name>/<name>.py`, its metric card `<name>/README.md`):

    import evaluate
    from draftsmith.metric_modules import METRICS_DIR
    acceptance = evaluate.load(str(METRICS_DIR / "acceptance"))   # offline: loaded by path
    speedup = evaluate.load(str(METRICS_DIR / "speedup"))

Each folder's `*_figures.py` holds the figures as pure functions: the only definition, which the
module's `_compute` and the eval report (eval/metrics.py) both call. This package imports nothing
from draftsmith, so any layer may use it.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
"""The folder holding the metric folders; `evaluate.load(str(METRICS_DIR / name))` loads one."""
