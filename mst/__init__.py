"""mst: exact Mini-Sequence Transformer (Luo et al., arXiv 2407.15892) for Hugging Face causal LMs.

    import mst
    model = mst.apply(model)          # mini-sequence MLP + chunked LM-head/loss + activation checkpointing
    loss = model(input_ids=ids, labels=ids).loss

Layers, imported one way only (tests/test_layering.py): ``mst.ops`` (pure autograd functions, no transformers) ->
``mst.integrations`` (HF patching: ``apply`` / ``revert``, the family table, checkpoint offload) -> ``mst.memory``
(optimizer-in-backward, measurement, planner) and ``mst.distributed`` (sequence parallelism), which build on ops,
integrations and ``mst.configs`` (bundled model configs) but not on each other.
"""
from .integrations import MsTOptions, apply, revert

__version__ = "0.1.0"
__all__ = ["MsTOptions", "apply", "revert", "__version__"]
