"""Layer-to-rank assignment: which rank inverts which factor (block) and preconditions which layer.

``assign`` places the statistic blocks by greedy LPT (``lpt``) under an n^3 / n^2 guess or a
measured ``hvd_ngd.costs.CostModel``, optionally splitting large factors into diagonal blocks
(``splitting.SplitPolicy``). ``grad_worker_groups`` / ``grad_receiver_groups`` are KAISA's
gradient-worker groups.
"""

from hvd_ngd.assignment.groups import grad_receiver_groups, grad_worker_groups
from hvd_ngd.assignment.items import (
    WorkItem,
    communication_elements,
    item_cost,
    layer_gradient_elements,
    side_cost,
    work_items,
)
from hvd_ngd.assignment.lpt import assign
from hvd_ngd.assignment.plan import AssignmentPlan, BlockTask, TaskKey
from hvd_ngd.assignment.splitting import SplitPolicy

__all__ = [
    "AssignmentPlan",
    "BlockTask",
    "SplitPolicy",
    "TaskKey",
    "WorkItem",
    "assign",
    "communication_elements",
    "grad_receiver_groups",
    "grad_worker_groups",
    "item_cost",
    "layer_gradient_elements",
    "side_cost",
    "work_items",
]
