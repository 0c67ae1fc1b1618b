"""Hugging Face integration: ``apply`` patches a *ForCausalLM in place, ``revert`` undoes it; ``offload`` keeps
the checkpointed layer inputs on CPU (``apply(offload_checkpoints=True)``)."""
from .families import FAMILIES, Family, is_gated_mlp, is_tokenwise_mlp
from .hf import MsTOptions, apply, options_dict, revert
from .offload import offloading_checkpoint

__all__ = ["FAMILIES", "Family", "MsTOptions", "apply", "is_gated_mlp", "is_tokenwise_mlp", "offloading_checkpoint",
           "options_dict", "revert"]
