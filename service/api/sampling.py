"""Sampling parameters from a request, checked against the service limits."""
from __future__ import annotations

from peer_model.generate import SamplingParams

from ..errors import InvalidInput
from ..settings import Settings


def sampling_params(settings: Settings, *, max_tokens: int | None, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    stop: str | list[str] | None = None, seed: int | None = None) -> SamplingParams:
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
    if max_tokens > settings.max_tokens_limit:
        raise InvalidInput(f"max_tokens is {max_tokens}; the limit is {settings.max_tokens_limit} "
                           f"(setting PEER_MAX_TOKENS_LIMIT)")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              stop=stop or (), seed=seed)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def check_prompt_chars(settings: Settings, *texts: str) -> None:
    """Refuse prompt text over PEER_MAX_PROMPT_CHARS before it is tokenized (its ids take ~8 bytes per byte)."""
    size = sum(len(text) for text in texts)
    if size > settings.max_prompt_chars:
        raise InvalidInput(f"the text is {size} characters; the limit is {settings.max_prompt_chars} "
                           f"(PEER_MAX_PROMPT_CHARS)")
