"""multipruner: training-free multidimensional structured pruning (MultiPruner, arXiv 2501.09949)."""

from .core.checkpoint import load_pruned, save_pruned
from .core.extract import extract
from .core.layout import ModelLayout, layout_of
from .core.plan import PlanError, PruningPlan, load_plan
from .core.reorder import reorder_weights
from .core.surgery import PrunableModel
from .models import load_model

__version__ = "0.1.0"

__all__ = [
    "ModelLayout",
    "PlanError",
    "PrunableModel",
    "PruningPlan",
    "extract",
    "layout_of",
    "load_model",
    "load_plan",
    "load_pruned",
    "reorder_weights",
    "save_pruned",
]
