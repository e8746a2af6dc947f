"""Sources: every format read correctly, and every bad-input case a one-line DataError naming the file."""

import builtins
import bz2
import gzip
import json
import lzma
import os
from pathlib import Path

import pytest

from amos_ds.data.sources import MAX_DOCUMENT_CHARS, SourceStats, expand_inputs, iter_documents, iter_sources
from amos_ds.data.wikipedia import wikitext_to_text
from amos_ds.errors import DataError

SHARED = Path(os.environ.get("AMOS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TEXT = "First line of doc one.\nSecond line of doc one.\n\n\nDoc two, only line.\n  \nDoc three.\n"
DOCS = ["First line of doc one.\nSecond line of doc one.", "Doc two, only line.", "Doc three."]


def read(path: Path) -> tuple[list[str], SourceStats]:
    stats = SourceStats()
    return list(iter_documents(path, stats)), stats


@pytest.mark.parametrize("opener,name", [(open, "a.txt"), (gzip.open, "a.txt.gz"), (bz2.open, "a.txt.bz2"),
                                          (lzma.open, "a.txt.xz"), (gzip.open, "misnamed.txt")])
def test_plain_and_compressed(tmp_path, opener, name):
    with opener(tmp_path / name, "wb") as f:
        f.write(TEXT.encode())
    docs, stats = read(tmp_path / name)
    assert docs == DOCS
    assert (stats.files, stats.documents, stats.replaced_bytes) == (1, 3, 0)
    assert stats.disk_bytes == (tmp_path / name).stat().st_size


def test_jsonl_and_compressed_jsonl(tmp_path):
    lines = [json.dumps({"text": "Alpha beta.\n\nGamma.", "id": 1}), "", json.dumps({"text": "Delta.", "id": 2})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    assert read(tmp_path / "a.jsonl")[0] == ["Alpha beta.", "Gamma.", "Delta."]
    assert read(tmp_path / "b.jsonl.gz")[0] == ["Alpha beta.", "Gamma.", "Delta."]


def test_jsonl_errors_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read(tmp_path / "bad.jsonl")
    (tmp_path / "field.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match=r"field.jsonl:1: no string field 'text'"):
        read(tmp_path / "field.jsonl")


def test_long_documents_are_cut_at_line_boundaries(tmp_path):
    line = "x" * 999
    (tmp_path / "long.txt").write_text((line + "\n") * 3000)
    docs, _ = read(tmp_path / "long.txt")
    per_doc = MAX_DOCUMENT_CHARS // 1000 + 1  # lines until a document reaches the cap: 1049
    assert [len(d) for d in docs] == [per_doc * 1000 - 1, per_doc * 1000 - 1, (3000 - 2 * per_doc) * 1000 - 1]
    assert "\n".join(docs) == "\n".join([line] * 3000)


def test_directories_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B.\n")
    (tmp_path / "sub" / "a.txt").write_text("A.\n")
    (tmp_path / ".hidden").write_text("H.\n")
    assert expand_inputs([str(tmp_path)]) == [tmp_path / "b.txt", tmp_path / "sub" / "a.txt"]
    assert expand_inputs([str(tmp_path / "**" / "*.txt"), str(tmp_path / "b.txt")]) == [
        tmp_path / "b.txt", tmp_path / "sub" / "a.txt"]
    assert list(iter_sources(expand_inputs([str(tmp_path)]), SourceStats())) == ["B.", "A."]


def test_wikitext_to_prose():
    wikitext = """{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">Cite {{cite|x}}</ref> She wrote
notes<ref>A book.</ref> on the [[Analytical Engine]] ([[1843]]).<!-- hidden -->
[[File:Ada.jpg|thumb|A [[portrait]] of her]]
{| class="wikitable"
|-
| cell || {{flag|UK}}
|}
== Life ==
* Born in [http://example.org London] &amp; raised&nbsp;there.
== References ==
Anything after this is dropped.
[[Category:Mathematicians]]
[[fr:Ada Lovelace]]"""
    assert wikitext_to_text(wikitext) == ("Ada Lovelace was an English mathematician. She wrote\n"
                                          "notes on the Analytical Engine (1843).\n"
                                          "Born in London & raised there.")


def test_wikipedia_dump_sample_yields_prose():
    dump = SHARED / "pretrain" / "enwiki-sample-pages-articles.xml.bz2"
    if not dump.exists():
        pytest.skip(f"{dump} not found (set AMOS_SHARED_DATA)")
    docs, stats = read(dump)
    # 206 pages: 205 in namespace 0, 106 of them not redirects (counted with a regex over the raw XML).
    assert len(docs) == 106 == stats.documents
    assert docs[0].startswith("Anarchism is a political philosophy that advocates self-governed societies")
    text = "\n".join(docs)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "</", "'''", "&nbsp;", "&amp;", "http://", "https://",
                   "[[Category:", "#REDIRECT", "{|", "|}", "<!--"):
        assert markup not in text, markup
    assert not any(line.startswith(("==", "*", "#", "|", "!")) for line in text.split("\n"))


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: no such file or directory; check the path"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match=r"\*.gz: the pattern matches no file"):
        expand_inputs([str(tmp_path / "*.gz")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir: the directory holds no file"):
        expand_inputs([str(tmp_path / "empty_dir")])


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("text\n")
    real_open = builtins.open

    def denying_open(file, *args, **kwargs):  # root ignores chmod 000, so deny the way the kernel would
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(DataError, match=r"secret.txt: cannot be read \(Permission denied\); check its permissions"):
        read(path)


def test_binary_file(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(DataError, match=r"image.png: looks binary \(NUL bytes\), not text; remove it from --input"):
        read(tmp_path / "image.png")


def test_corrupt_compressed_file(tmp_path):
    data = gzip.compress(TEXT.encode() * 100)
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.gz: corrupt or truncated"):
        read(tmp_path / "cut.gz")


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café naïve\n\nok\n".encode("latin-1") + b"\xff\xfe end\n")
    docs, stats = read(tmp_path / "latin1.txt")
    assert docs == ["caf\ufffd na\ufffdve", "ok\n\ufffd\ufffd end"]
    assert stats.replaced_bytes == 4
    assert stats.replaced_by_file == {str(tmp_path / "latin1.txt"): 4}
