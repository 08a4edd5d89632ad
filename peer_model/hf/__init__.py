"""Pretrained Hugging Face-format models: load (Llama family, GPT-2), retrofit PEER layers, export.

Everything runs on our own modules (:mod:`peer_model.model` configured by :mod:`.families`); the
``transformers`` package is used by the tests only, as the reference the logits are compared with.
"""
from .export import export_hf
from .families import SUPPORTED_TYPES, UnsupportedModel
from .load import is_hf_dir, load_hf, read_hf_config
from .retrofit import resolve_layers, retrofit

__all__ = ["SUPPORTED_TYPES", "UnsupportedModel", "export_hf", "is_hf_dir", "load_hf", "read_hf_config",
           "resolve_layers", "retrofit"]
