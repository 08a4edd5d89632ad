"""The console's Jinja templates and their filters."""
from __future__ import annotations

from pathlib import Path

from fastapi.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")


def when(value) -> str:
    """A datetime or ISO string as 'YYYY-MM-DD HH:MM:SS' (UTC)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else value.isoformat()
    return text[:19].replace("T", " ")


def size(value: int | None) -> str:
    if value is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return ""


templates.env.filters.update(when=when, size=size)
