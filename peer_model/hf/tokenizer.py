"""A pretrained model's own tokenizer: ``tokenizer.json`` (the ``tokenizers`` library) and its chat template.

:meth:`HFTokenizer.from_dir` reads what a Hugging Face model directory says about its special ids:
``tokenizer_config.json`` (special token strings, chat template), ``config.json`` and
``generation_config.json`` (bos/eos ids). The tokenizer's own rule decides whether a context starts with
BOS (``add_bos``: ``add_bos_token``, else what its post-processor adds): Llama's do, GPT-2's, Qwen's and
SmolLM2's do not. A model without a BOS id uses its first EOS id where one is needed (an empty prompt).
Generation stops at every EOS id and at the chat template's end-of-turn token.

Chat templates are Jinja code from the Hub, so they run in jinja2's immutable sandbox with the
globals and filters ``transformers`` gives them (``raise_exception``, ``strftime_now``, a ``tojson``
that does not escape HTML); the rendered chat is then plain text for :meth:`HFTokenizer.encode`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the default template here
LEGACY_TEMPLATE_FILE = "chat_template.json"  # {"chat_template": ...}, older processors
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REPLACEMENT = "\ufffd"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the model's special ids and chat template; immutable.

    ``vocab_size`` is one past the largest id the tokenizer knows (the model's embedding may be larger).
    """

    kind = "hf"

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int, eos_ids: Sequence[int], pad_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None, tokenizer_config: Mapping | None = None,
                 generation_config: Mapping | None = None):
        self._tokenizer = tokenizer
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self._eos_order = tuple(dict.fromkeys(eos_ids))  # the first is the main one; kept for save()
        if not self._eos_order:
            raise ValueError("the tokenizer has no eos token: generation could never stop")
        for name, value in (("bos", bos_id), ("pad", pad_id), *(("eos", e) for e in self._eos_order)):
            if value is not None and not (_is_id(value) and value < self.vocab_size):
                raise ValueError(f"{name} id {value!r} is not an id of the tokenizer (0 .. {self.vocab_size - 1})")
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.pad_id = pad_id
        self.chat_template = chat_template
        self._config = dict(tokenizer_config or {})
        self._generation_config = dict(generation_config or {})
        self._eos_order = tuple(dict.fromkeys((*self._eos_order, *self._end_of_turn())))
        self.eos_ids = frozenset(self._eos_order)
        self.never_sampled = frozenset(i for i in (bos_id if add_bos else None, pad_id) if i is not None) - self.eos_ids

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Read a model directory (see the module docstring); ValueError names the file that is missing or
        unusable."""
        root = Path(path)
        file = root / TOKENIZER_FILE
        if not file.is_file():
            raise ValueError(f"{root}: no {TOKENIZER_FILE} (a Hugging Face tokenizer needs one)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library raises plain Exception on a malformed file
            raise ValueError(f"{file}: not a tokenizers file: {exc}") from None
        config = _read_json(root / TOKENIZER_CONFIG)
        generation = _read_json(root / GENERATION_CONFIG)
        model_config = _read_json(root / MODEL_CONFIG)

        def config_ids(key: str) -> list[int]:
            """``key``'s ids in generation_config.json, then config.json."""
            return [*_ids(generation, key, root / GENERATION_CONFIG), *_ids(model_config, key, root / MODEL_CONFIG)]

        def token_id(name: str) -> int | None:
            """The id of tokenizer_config.json's ``name`` (e.g. "eos_token"); None when it names none."""
            token = _token_text(config.get(name))
            if token is None:
                return None
            value = tokenizer.token_to_id(token)
            if value is None:
                raise ValueError(f"{root / TOKENIZER_CONFIG}: {name} {token!r} is not in {TOKENIZER_FILE}")
            return value

        eos = [i for i in (*config_ids("eos_token_id"), token_id("eos_token")) if i is not None]
        if not eos:
            raise ValueError(f"{root}: no eos token in {GENERATION_CONFIG}, {MODEL_CONFIG} or {TOKENIZER_CONFIG}: "
                             "generation could never stop")
        bos = (config_ids("bos_token_id") or [token_id("bos_token")])[0]
        pad = token_id("pad_token")
        if pad is None:
            pad = (config_ids("pad_token_id") or [None])[0]
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):  # no flag: what the post-processor puts before a text
            add_bos = bos is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [bos]
        try:
            return cls(tokenizer, bos_id=eos[0] if bos is None else bos, eos_ids=eos, pad_id=pad, add_bos=add_bos,
                       chat_template=_chat_template(root, config), tokenizer_config=config,
                       generation_config=generation)
        except ValueError as exc:
            raise ValueError(f"{root}: {exc}") from None

    def __deepcopy__(self, memo: dict) -> HFTokenizer:
        return self  # immutable: copies of a model share it

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Never raises: special ids and ids the tokenizer does not know are skipped; bytes that are not
        valid UTF-8 become U+FFFD."""
        known = [i for i in map(int, ids) if 0 <= i < self.vocab_size]  # tokenizers raises on negative ids
        return self._tokenizer.decode(known, skip_special_tokens=True)

    def stream_decoder(self) -> HFStreamDecoder:
        return HFStreamDecoder(self)

    def save(self, directory: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json; :meth:`from_dir` on
        ``directory`` then gives this tokenizer back (same ids, same template). Other tools read them too."""
        directory = Path(directory)
        self._tokenizer.save(str(directory / TOKENIZER_FILE))
        config = {key: value for key, value in self._config.items() if key != "chat_template"}
        config["add_bos_token"] = self.add_bos
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        generation = {**self._generation_config, "bos_token_id": self.bos_id, "eos_token_id": list(self._eos_order),
                      "pad_token_id": self.pad_id}
        for name, data in ((TOKENIZER_CONFIG, config), (GENERATION_CONFIG, generation)):
            (directory / name).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")

    # ---- chat ------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the model was trained to read it (``transformers``' ``apply_chat_template(...,
        tokenize=False)``). Keys whose value is None are dropped first, as transformers does: templates
        test whether a key is there. ValueError when the model has no template or the template rejects
        the chat (its ``raise_exception``)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template: send a plain prompt instead")
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        special = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(self._config.get(name)))}
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from None

    def _end_of_turn(self) -> tuple[int, ...]:
        """The special id the chat template writes right after an assistant's message (ChatML's
        ``<|im_end|>``, Llama 3's ``<|eot_id|>``): a reply ends there. () without a template, or when the
        template writes no special token there."""
        if self.chat_template is None:
            return ()
        sentinel = "PEER-REPLY-SENTINEL"
        try:
            chat = self.apply_chat_template([{"role": "user", "content": "question"},
                                             {"role": "assistant", "content": sentinel}], add_generation_prompt=False)
        except ValueError:
            return ()
        after = chat.partition(sentinel)[2]
        ids = self._tokenizer.encode(after, add_special_tokens=False).ids[:1] if after else []
        special = {i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
        return tuple(i for i in ids if i in special)

    @cached_property
    def _template(self) -> jinja2.Template:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        try:
            return environment.from_string(self.chat_template)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from None


class HFStreamDecoder:
    """Incremental detokenisation as TGI and vLLM do it.

    A token's text can depend on its neighbours (a byte-level token may hold half a character; some
    decoders strip the space of the first token of a decode). So each push decodes a window: the ids
    already released since ``_prefix`` (context) and the new ones after ``_read``; the new suffix of the
    text is released once it does not end in U+FFFD (an incomplete character). Released text always
    ends on a complete character, so the pieces concatenate to ``decode`` of all ids.
    """

    def __init__(self, tokenizer: HFTokenizer):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of the ids whose text is released

    def push(self, token_id: int) -> str:
        """Feed one id; return the text completed by it (often "")."""
        self._ids.append(int(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        """End the stream: an incomplete trailing character becomes U+FFFD. Resets the decoder."""
        text = self._release(final=True)
        self._ids, self._prefix, self._read = [], 0, 0
        return text

    def _release(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        # the released ids become the next context; older ids are never decoded again
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(before) :]


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_json(path: Path) -> dict:
    """The object in ``path``; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def _ids(config: Mapping, key: str, path: Path) -> list[int]:
    """``config[key]``: an id, a list of ids, or null/absent (→ [])."""
    value = config.get(key)
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(_is_id(v) for v in values):
        raise ValueError(f"{path}: {key} must be a token id or a list of them, got {value!r}")
    return values


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(root: Path, config: Mapping) -> str | None:
    """The default chat template: chat_template.jinja, else chat_template.json, else tokenizer_config.json
    (transformers' order). A list of named templates gives its "default" one; None when there is none."""
    if (root / TEMPLATE_FILE).is_file():
        return (root / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = _read_json(root / LEGACY_TEMPLATE_FILE).get("chat_template", config.get("chat_template"))
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson``: plain ``json.dumps`` (Jinja's own escapes <, >, & and ' for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
