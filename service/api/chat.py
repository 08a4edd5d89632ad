"""Chat messages → prompt ids: the serving model's own chat template, or a plain transcript without one.

A pretrained model with a chat template (``tokenizer_config.json``) reads the chat as it was trained to.
A model without one (the byte-level default, a base model such as GPT-2) gets a transcript, one line per
message, ending with the cue for the answer::

    System: You are terse.
    User: Hello!
    Assistant:

and the answer ends where the model starts the user's next line (``TRANSCRIPT_STOP``).
"""
from __future__ import annotations

from peer_model.tokenizer import Tokenizer

from .schemas import ChatMessage

TRANSCRIPT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
TRANSCRIPT_STOP = "\nUser:"


def transcript(messages: list[ChatMessage]) -> str:
    lines = [f"{TRANSCRIPT_ROLES[m.role]}: {m.content}" for m in messages]
    return "\n".join([*lines, f"{TRANSCRIPT_ROLES['assistant']}:"])


def has_chat_template(tokenizer: Tokenizer) -> bool:
    return getattr(tokenizer, "has_chat_template", False)  # byte-level tokenizers have none


def chat_stops(tokenizer: Tokenizer, stop: str | list[str] | None) -> list[str]:
    """The caller's stop strings, and for a transcript (no chat template) the start of the user's next line."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return stops if has_chat_template(tokenizer) else [*stops, TRANSCRIPT_STOP]


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The chat's prompt ids for ``tokenizer``'s model. The special tokens the template renders (ChatML's
    ``<|im_start|>``) are the prompt's own. Generation adds the BOS itself when the tokenizer adds one,
    so a BOS that the template writes first (Llama's ``{{ bos_token }}``) is dropped then: the context
    never starts with two. ValueError when the template rejects the chat (e.g. roles that do not alternate)."""
    if not has_chat_template(tokenizer):
        return tokenizer.encode(transcript(messages))
    ids = tokenizer.encode(tokenizer.apply_chat_template([m.model_dump() for m in messages]))
    return ids[1:] if tokenizer.add_bos and ids[:1] == [tokenizer.bos_id] else ids
