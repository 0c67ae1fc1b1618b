"""mst: exact Mini-Sequence Transformer (Luo et al., arXiv 2407.15892) for Hugging Face causal LMs.

    import mst
    model = mst.apply(model)          # mini-sequence MLP + chunked LM-head/loss + activation checkpointing
    loss = model(input_ids=ids, labels=ids).loss

Layers: ``mst.ops`` (pure autograd functions) -> ``mst.integrations`` (HF patching) -> ``mst.memory``
(checkpoint offload, optimizer-in-backward, measurement, planner) -> ``mst.distributed`` (sequence parallelism).
"""
from .integrations import MsTOptions, apply, revert

__version__ = "0.1.0"
__all__ = ["MsTOptions", "apply", "revert", "__version__"]
