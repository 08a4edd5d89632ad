"""Server-sent events as clients split them."""
from __future__ import annotations

import json

from service.api.streaming import sse


def test_an_event_stays_one_line_for_clients_that_split_on_every_unicode_line_break():
    """Found by the soak (benchmarks/soak.py): a byte-level model sampled U+0085, JSON left it raw, and
    httpx's iter_lines (peerctl's reader) split the data line there, so the event no longer parsed."""
    text = "a\x85b\u2028c\u2029d\x1ce\r\nf"
    event = sse({"text": text, "version": 2}, "token")
    lines = event.splitlines()
    assert lines[:2] == ["event: token", lines[1]] and lines[2:] == [""]
    assert json.loads(lines[1].removeprefix("data: ")) == {"text": text, "version": 2}
    assert "é" in sse({"text": "é"})  # other non-ASCII text stays readable
