"""Hugging Face integration: ``apply`` patches a *ForCausalLM in place, ``revert`` undoes it."""
from .families import FAMILIES, Family, is_gated_mlp
from .hf import MsTOptions, apply, options_dict, revert

__all__ = ["FAMILIES", "Family", "MsTOptions", "apply", "is_gated_mlp", "options_dict", "revert"]
