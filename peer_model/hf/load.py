"""Load a Hugging Face-format model directory into a :class:`PEERTransformer`, from local files only.

The directory holds ``config.json``, the weights as ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, and ``tokenizer.json`` (+ ``tokenizer_config.json``). Nothing is
fetched from a hub, and no code of ``transformers`` runs: the family's options become a
:class:`ModelConfig` and its tensors are renamed into ours (:mod:`peer_model.hf.families`).

A directory written by :func:`peer_model.hf.export.export_hf` also carries its expert layers (their
tensors under ``...peer.*`` and a ``peer_retrofit`` section in config.json); they are loaded too.

A GGUF file (or a directory holding one) loads the same way: :mod:`peer_model.hf.gguf` gives its
config, its tensors under the Hugging Face names and its tokenizer. So does the name of a base that a
package ships (:mod:`peer_model.hf.bases`, e.g. ``smollm2``).
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelConfig, PEERConfig
from ..model import PEERTransformer
from ..pool import ExpertGrid
from ..tokenizer import load_tokenizer
from .bases import PACKAGED_BASES, resolve_base
from .families import GPT2_TYPES, Source, UnsupportedModel, config_fields, expert_prefix, model_type, weight_map
from .gguf import GGUFModel, find_gguf

CONFIG = "config.json"
RETROFIT_KEY = "peer_retrofit"  # config.json section written by export_hf


def read_hf_config(path: str | os.PathLike[str]) -> dict:
    """The Hugging Face config of a model directory, or the one a GGUF file's metadata implies."""
    path = resolve_base(path)
    gguf = find_gguf(path)
    if gguf is not None:
        return GGUFModel(gguf).hf_config
    file = Path(path) / CONFIG
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModel(f"{file}: not a readable Hugging Face config: {exc}") from exc
    if not isinstance(hf, dict) or "model_type" not in hf:
        raise UnsupportedModel(f"{file}: no model_type (is this a Hugging Face model directory?)")
    return hf


def is_pretrained(path: str | os.PathLike[str]) -> bool:
    """A pretrained model to load with :func:`load_hf`: a Hugging Face directory, a GGUF file or the name
    of a packaged base."""
    if str(path) in PACKAGED_BASES:
        return True
    try:
        return is_hf_dir(path) or find_gguf(path) is not None
    except UnsupportedModel:  # a directory of several GGUF files: loading it says which to name
        return True


def is_hf_dir(path: str | os.PathLike[str]) -> bool:
    """A Hugging Face model directory (as opposed to one of our checkpoints, whose config has "format")."""
    try:
        meta = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "format" not in meta


class HFWeights:
    """The tensors of a model directory by name, read lazily from one file or an index of shards."""

    def __init__(self, root: Path):
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: root / file for name, file in weight_map.items()}
        elif (root / "model.safetensors").is_file():
            with safe_open(root / "model.safetensors", "pt") as f:
                self.files = {name: root / "model.safetensors" for name in f.keys()}
        else:
            bins = sorted(p.name for p in root.glob("*.bin"))
            hint = f" (found {bins[0]}: convert it to safetensors first)" if bins else ""
            raise UnsupportedModel(f"{root}: no model.safetensors or model.safetensors.index.json{hint}")
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise UnsupportedModel(f"the checkpoint has no tensor {name!r}")
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(file, "pt")
        return self._open[file].get_tensor(name)


def _normalised(weights: HFWeights, kind: str) -> dict[str, str]:
    """Family key → stored key. GPT-2 checkpoints are stored with or without the ``transformer.`` prefix."""
    names = {}
    for name in weights.names():
        key = name
        if kind in GPT2_TYPES and not name.startswith(("transformer.", "lm_head.")):
            key = f"transformer.{name}"
        names[key] = name
    return names


def gather(source: Source, read) -> torch.Tensor:
    parts = [read(key) for key in source.keys]
    if source.transposed:
        parts = [p.t() for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def load_hf(path: str | os.PathLike[str], *, max_seq_len: int | None = None, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> PEERTransformer:
    """The model of a Hugging Face directory, a GGUF file or a packaged base (by name) with its own
    tokenizer, in eval mode; its config's ``hf_config["_name_or_path"]`` says which. ``max_seq_len`` caps
    the context (default: the model's, at most 4096, since the KV cache grows with it)."""
    root = resolve_base(path)
    gguf_file = find_gguf(root)
    if gguf_file is not None:
        gguf = GGUFModel(gguf_file)
        hf, stored, reader, tokenizer = gguf.hf_config, gguf.hf_names(), gguf.read, gguf.tokenizer
        kind = model_type(hf)
    else:
        hf = read_hf_config(root)
        kind = model_type(hf)
        weights = HFWeights(root)
        stored, reader = _normalised(weights, kind), weights.get
        tokenizer = partial(load_tokenizer, root)
    retrofit = hf.get(RETROFIT_KEY)
    fields = config_fields(hf, max_seq_len)
    grids: dict[int, ExpertGrid] = {}
    if retrofit:
        fields.update(peer_layers=[int(i) for i in retrofit["pools"]], peer=PEERConfig(**retrofit["peer"]),
                      ffw="peer", peer_branch=retrofit["branch"], base_trains=retrofit["base_trains"])
        grids = {int(i): ExpertGrid.from_list(segments) for i, segments in retrofit["pools"].items()}
    hf_config = {k: v for k, v in hf.items() if k != RETROFIT_KEY}
    config = ModelConfig(**fields, hf_config={**hf_config, "_name_or_path": str(path)})
    with torch.device(device):
        model = PEERTransformer(config, grids).to(dtype)

    def read(key: str) -> torch.Tensor:
        if key not in stored:
            raise UnsupportedModel(f"{root}: the checkpoint has no tensor {key!r}")
        return reader(stored[key])

    sources = {ours: (lambda source=source: gather(source, read)) for ours, source in weight_map(config, kind).items()}
    for block, layer in model.expert_layers().items():
        ours = "ffw" if config.peer_branch == "replace" else "expert_branch"
        for name in layer.state_dict():
            key = f"{expert_prefix(kind, block)}.{name}"
            sources[f"blocks.{block}.{ours}.{name}"] = lambda key=key: read(key)
    _load_state(model, sources, root)
    model.tokenizer = tokenizer()
    if model.tokenizer.vocab_size > config.vocab_size:
        raise UnsupportedModel(f"{root}: the tokenizer has {model.tokenizer.vocab_size} ids, the model's "
                               f"embedding only {config.vocab_size}")
    return model.eval()


def _load_state(model: PEERTransformer, sources: dict, root: Path) -> None:
    """Copy every tensor into the model as it is read (``sources``: our key → a reader), so the peak
    memory is the model plus one tensor, not two models."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sources and not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing:
        raise UnsupportedModel(f"{root}: no source for {missing[:5]}")
    with torch.no_grad():
        for key, reader in sources.items():
            tensor = reader()
            if key == "pos_embed.weight":  # GPT-2's table may be longer than the context served
                tensor = tensor[: model.config.max_seq_len]
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise UnsupportedModel(f"{root}: {key} has shape {tuple(tensor.shape)}, the config implies "
                                       f"{tuple(expected[key].shape)}")
            expected[key].copy_(tensor)
