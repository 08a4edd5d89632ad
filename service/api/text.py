"""Text fields that the database and the tokenizers can hold, checked where a request is parsed (422).

JSON can carry lone surrogates (``"\\ud800"``), which are not text: UTF-8 cannot encode them, so they
failed deep inside (the tokenizer, the store, the database driver) as a 500. Text the database stores (names,
activation reasons, stream documents) cannot hold NUL either: PostgreSQL refuses U+0000 in any text (a DataError,
a 500). Names are bounded by their columns (VARCHAR(200)); a stream's name by less, because its corpora are named
``"{stream} #{first}-{last}"``.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StringConstraints

from ..errors import InvalidInput

NAME_MAX = 200  # corpora.name, activations.reason
STREAM_NAME_MAX = 100  # leaves room for " #<first id>-<last id>" in the corpus name


def valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate U+{ord(value[exc.start]):04X} at character "
                         f"{exc.start}") from None
    return value


def storable(value: str) -> str:
    """Text the database can store: valid Unicode without NUL."""
    if "\x00" in value:
        raise ValueError(f"NUL (U+0000) at character {value.index(chr(0))}: the database cannot store it")
    return valid_unicode(value)


def check_storable(value: str, what: str) -> None:
    """:func:`storable` for a value read outside a schema (a form field, a file name): 422 naming ``what``."""
    try:
        storable(value)
    except ValueError as exc:
        raise InvalidInput(f"{what}: {exc}") from None


Text = Annotated[str, AfterValidator(valid_unicode)]
StoredText = Annotated[str, AfterValidator(storable)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX), AfterValidator(storable)]
Reason = Annotated[str, StringConstraints(max_length=NAME_MAX), AfterValidator(storable)]
