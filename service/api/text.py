"""Text fields that the database and the tokenizers can hold, checked where a request is parsed (422).

JSON can carry lone surrogates (``"\\ud800"``), which are not text: UTF-8 cannot encode them, so they
failed deep inside (the tokenizer, the store, the database driver) as a 500. Names are bounded by their
columns (VARCHAR(200)); a stream's name by less, because its corpora are named ``"{stream} #{first}-{last}"``.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StringConstraints

NAME_MAX = 200  # corpora.name, activations.reason
STREAM_NAME_MAX = 100  # leaves room for " #<first id>-<last id>" in the corpus name


def valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate U+{ord(value[exc.start]):04X} at character "
                         f"{exc.start}") from None
    return value


Text = Annotated[str, AfterValidator(valid_unicode)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX), AfterValidator(valid_unicode)]
Reason = Annotated[str, StringConstraints(max_length=NAME_MAX), AfterValidator(valid_unicode)]
