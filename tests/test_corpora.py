import shutil

import pytest

from peer_model import corpora
from peer_model.corpora import (
    CorpusUnavailable,
    clean_gcide,
    load_corpus,
    resolve_data_dir,
    split_train_val,
    strip_gutenberg,
    truncate_utf8,
)

GCIDE_SNIPPET = """\
Affect \\Af*fect"\\, v. t. [imp. & p. p. {Affected}; p. pr. & vb.
   n. {Affecting}.] [L. affectus; cf. F. affect['e].]
   1. To act upon; to produce an effect or change upon.
      [1913 Webster]

            As might affect the earth with cold heat. --Milton.
      [1913 Webster +PJC]



<p><hw>Al*ge"bra</hw> <pos>n.</pos> <def>A branch of   mathematics.</def>   [WordNet 1.5]</p>
   Sp[ae]n, Caf['e], na["i]ve, [eth]
"""


def test_clean_gcide_strips_markup():
    out = clean_gcide(GCIDE_SNIPPET)
    assert out == (
        "Affect, v. t. [imp. & p. p. Affected; p. pr. & vb.\n"
        "n. Affecting.] [L. affectus; cf. F. affecté.]\n"
        "1. To act upon; to produce an effect or change upon.\n"
        "\n"
        "As might affect the earth with cold heat. --Milton.\n"
        "\n"
        'Al*ge"bra n. A branch of mathematics.\n'
        "Spæn, Café, naïve, ð\n"
    )


def test_clean_gcide_keeps_usage_labels():
    assert clean_gcide("To infatuate. [Obs.] --Milton.\n") == "To infatuate. [Obs.] --Milton.\n"


def test_strip_gutenberg():
    sample = (
        "The Project Gutenberg EBook of Hamlet\n"
        "This eBook is for the use of anyone anywhere at no cost\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "\n"
        "HAMLET, PRINCE OF DENMARK\n"
        "Ber.\nWho's there?\n"
        "\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "Updated editions will replace the previous one.\n"
    )
    assert strip_gutenberg(sample) == "HAMLET, PRINCE OF DENMARK\nBer.\nWho's there?\n"


def test_strip_gutenberg_without_markers_keeps_text():
    assert strip_gutenberg("Ber.\nWho's there?\n") == "Ber.\nWho's there?\n"


def test_truncate_prefers_line_break():
    text = "first line\nsecond line\nthird"
    assert truncate_utf8(text, 15) == "first line\n"
    assert truncate_utf8(text, len(text)) == text
    assert truncate_utf8(text, 0) == ""


def test_truncate_never_splits_a_character():
    text = "aé€🙂" * 5  # 1 + 2 + 3 + 4 bytes, no line breaks
    data = text.encode("utf-8")
    for n in range(len(data) + 1):
        out = truncate_utf8(text, n)  # would raise if cut mid-character
        assert text.startswith(out)
        assert n - 3 <= len(out.encode("utf-8")) <= n


def test_load_corpus_uses_cache_and_truncates(tmp_path):
    (tmp_path / "jargon.txt").write_text("hacker\nwizard é\nguru\n", encoding="utf-8")
    assert load_corpus("jargon", data_dir=tmp_path) == "hacker\nwizard é\nguru\n"
    assert load_corpus("jargon", data_dir=tmp_path, max_bytes=17) == "hacker\nwizard é\n"
    assert load_corpus("jargon", data_dir=tmp_path, max_bytes=16) == "hacker\n"


def test_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PEER_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("PEER_DATA_DIR")
    assert resolve_data_dir() == corpora.DEFAULT_DATA_DIR


def test_unknown_corpus(tmp_path):
    with pytest.raises(KeyError, match="unknown corpus"):
        load_corpus("wikitext", data_dir=tmp_path)


def test_failing_tool_raises_corpus_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get reachable
    with pytest.raises(CorpusUnavailable) as info:
        load_corpus("jargon", data_dir=tmp_path)
    assert info.value.name == "jargon" and "apt-get" in info.value.reason
    assert list(tmp_path.iterdir()) == []  # no partial cache left behind


def numbered_text(n_lines: int) -> str:
    return "".join(f"line {i} of the corpus, some words here\n" for i in range(n_lines))


def test_split_is_deterministic_and_seeded():
    text = numbered_text(20_000)
    assert split_train_val(text, seed=3) == split_train_val(text, seed=3)
    assert split_train_val(text, seed=3) != split_train_val(text, seed=4)


@pytest.mark.parametrize("n_lines", [5, 300, 20_000])
def test_split_covers_all_lines_without_overlap(n_lines):
    text = numbered_text(n_lines)
    train, val = split_train_val(text, val_fraction=0.1)
    train_lines, val_lines = train.splitlines(), val.splitlines()
    assert sorted(train_lines + val_lines) == sorted(text.splitlines())
    assert not set(train_lines) & set(val_lines)
    assert train and val
    if n_lines == 20_000:
        assert 0.05 < len(val) / len(text) < 0.15


def test_split_val_is_contiguous_blocks():
    text = numbered_text(20_000)
    _, val = split_train_val(text, val_fraction=0.05, block_chars=4096)
    numbers = [int(line.split()[1]) for line in val.splitlines()]
    runs = 1 + sum(b != a + 1 for a, b in zip(numbers, numbers[1:]))
    assert runs <= 0.05 * len(text) / 4096 + 1  # whole blocks, not scattered lines


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError):
        split_train_val("a\nb\n", val_fraction=1.0)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_fetch_jargon_for_real(tmp_path):
    text = load_corpus("jargon", data_dir=tmp_path)
    assert len(text.encode("utf-8")) > 500_000
    assert "hacker" in text and "The Jargon File" in text
    assert (tmp_path / "jargon.txt").read_text(encoding="utf-8") == text
    assert [p.name for p in tmp_path.iterdir()] == ["jargon.txt"]
