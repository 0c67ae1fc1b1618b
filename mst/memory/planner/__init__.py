"""Memory planner: the peak of one training step and the longest sequence that fits, without a GPU.

Two engines share one composition (``compose``: weights, gradients, optimizer state, the per-layer stack of saved
activations and the largest transient, i.e. the paper's Theorems 1-3):
- ``analytic``: closed-form sizes of every tensor an HF decoder layer and MsT's ops keep (``analytic.py``);
- ``traced``: runs the real HF and ``mst`` code on fake tensors and counts bytes (``traced.py``).
Both agree with measured CPU steps (``mst.memory.measure_peak``) to well under 1 % (``tests/memory``).
``model_state="host"`` plans weights, gradients and Adam states on the host through DeepSpeed ZeRO-3 offload
(``ZeroOffload``); ``step_cost`` adds a step's FLOPs, host traffic and a time estimate (``cost.py``).
Which families: the rows of ``mst.integrations.FAMILIES`` (the table ``mst.apply`` uses); ``ModelSpec.from_config``
reads a config's row and raises ValueError for anything else.
"""
from .compose import HeadProfile, LayerProfile, Plan
from .cost import StepCost, step_cost
from .plan import DEFAULT_MAX_LEN, DEFAULT_RESERVE_GB, ENGINES, MaxSeqLen, max_seq_len, plan
from .spec import MODEL_STATES, Budget, ModelSpec, Workload, ZeroOffload, family_row

__all__ = ["DEFAULT_MAX_LEN", "DEFAULT_RESERVE_GB", "ENGINES", "MODEL_STATES", "Budget", "HeadProfile",
           "LayerProfile", "MaxSeqLen", "ModelSpec", "Plan", "StepCost", "Workload", "ZeroOffload", "family_row",
           "max_seq_len", "plan", "step_cost"]
