"""Pretrained models (Hugging Face directories of the Llama family and GPT-2, GGUF files): load, retrofit
PEER layers, export.

Everything runs on our own modules (:mod:`peer_model.model` configured by :mod:`.families`); the
``transformers`` package is used by the tests only, as the reference the logits are compared with.
"""
from .export import export_hf
from .families import SUPPORTED_TYPES, UnsupportedModel
from .load import is_pretrained, load_hf, read_hf_config
from .retrofit import resolve_layers, retrofit

__all__ = ["SUPPORTED_TYPES", "UnsupportedModel", "export_hf", "is_pretrained", "load_hf", "read_hf_config",
           "resolve_layers", "retrofit"]
