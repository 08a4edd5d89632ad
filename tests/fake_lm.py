"""The base of the tests' stand-in language models."""
import torch
from torch import nn


class FakeLM(nn.Module):
    """A stand-in defines ``forward`` (tokens (B, T), a cache → logits (B, T, vocab)) as PEERTransformer does; the
    decoding entry point, the last position's logits, follows from it."""

    def last_logits(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        return self(tokens, cache)[:, -1]
