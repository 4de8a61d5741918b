"""multipruner: training-free multidimensional structured pruning (MultiPruner, arXiv 2501.09949)."""

from .export import extract, load_pruned, prepare_dense, save_pruned
from .layout import ModelLayout, layout_of
from .models import load_model
from .plan import PlanError, PruningPlan, load_plan
from .reorder import reorder_weights
from .surgery import PrunableModel

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
    "prepare_dense",
    "reorder_weights",
    "save_pruned",
]
