"""Export a model that came from a Hugging Face directory back to that format.

The dense tensors get the family's names and layout back (the fused query/key/value matrix split,
GPT-2's Conv1D weights transposed), so ``transformers`` and other tools load the base model from the
directory as they would the original; the expert layers are stored beside them under
``<layer prefix>.peer.*`` with their pools in config.json's ``peer_retrofit`` section, which those
tools ignore and :func:`peer_model.hf.load.load_hf` reads back.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model import PEERTransformer
from .families import GPT2_TYPES, UnsupportedModel, expert_prefix, model_type, weight_map
from .load import CONFIG, RETROFIT_KEY


def export_hf(model: PEERTransformer, out_dir: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (loaded or retrofitted from a Hugging Face directory) to ``out_dir``: config.json,
    model.safetensors and the tokenizer's files. ``dtype``: the stored dtype (default: the model's)."""
    hf = model.config.hf_config
    if not hf:
        raise UnsupportedModel("only a model loaded from a Hugging Face directory can be exported to that format "
                               "(this one has no hf_config)")
    kind = model_type(hf)
    config = model.config
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for ours, source in weight_map(config, kind).items():
        tensor = state[ours]
        parts = tensor.split(list(source.sizes), dim=0) if source.sizes else (tensor,)
        for key, part in zip(source.keys, parts):
            tensors[key] = part.t() if source.transposed else part
    pools = {}
    for block, layer in model.peer_layers().items():
        for name, tensor in layer.state_dict().items():
            tensors[f"{expert_prefix(kind, block)}.{name}"] = tensor
        pools[str(block)] = layer.grid.to_list()
    meta = {k: v for k, v in hf.items() if k != RETROFIT_KEY}
    if kind in GPT2_TYPES:  # a model served with a shorter context than GPT-2's table kept only its first rows
        meta["n_positions"] = config.max_seq_len
    if pools:
        meta[RETROFIT_KEY] = {"peer": asdict(config.peer), "branch": config.peer_branch,
                              "base_trains": config.base_trains, "pools": pools}
    tensors = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().contiguous().cpu()
               for k, t in tensors.items()}
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.tokenizer.save(tmp)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
