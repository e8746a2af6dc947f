"""The command line: tokenizer train -> preprocess -> inspect, and bad input as one line with exit code 2."""

import gzip
from pydoc_data.topics import topics

import pytest

from amos_ds import cli


def run(*argv: str) -> int:
    return cli.main(list(argv))


def test_end_to_end(tmp_path, capsys):
    with gzip.open(tmp_path / "docs.txt.gz", "wt") as f:
        for name in sorted(topics)[:30]:  # one document per topic: no blank line inside
            f.write("\n".join(line for line in topics[name].splitlines() if line.strip()) + "\n\n")
    assert run("tokenizer", "train", "--input", str(tmp_path / "docs.txt.gz"), "--vocab-size", "700", "--lowercase",
               "--output", str(tmp_path / "tok")) == 0
    assert "700 pieces, uncased" in capsys.readouterr().out
    assert run("preprocess", "--input", str(tmp_path / "*.gz"), "--tokenizer", str(tmp_path / "tok"), "--output",
               str(tmp_path / "data"), "--workers", "2", "--shard-mb", "0.03") == 0
    captured = capsys.readouterr()
    assert "30 documents" in captured.out and "preprocess 100.0%" in captured.err and "MB/s" in captured.err
    assert run("inspect", str(tmp_path / "data"), "--seq-len", "64") == 0
    out = capsys.readouterr().out
    assert "30 documents" in out and out.count("checksums ok") == 5 and "[MASK]" in out and "labels: " in out
    # A flipped byte in a shard: inspect fails with one line naming the shard.
    shard = tmp_path / "data" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    assert run("inspect", str(tmp_path / "data")) == 2
    err = capsys.readouterr().err
    assert err.startswith("amos-ds: error: ") and "shard-00000.bin: checksum mismatch" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["tokenizer", "train", "--input", "{tmp}/missing.txt", "--vocab-size", "1000", "--output", "{tmp}/t"],
     "missing.txt: no such file or directory; check the path"),
    (["preprocess", "--input", "{tmp}/x.txt", "--tokenizer", "{tmp}/nothing", "--output", "{tmp}/o"],
     "nothing: not a tokenizer folder"),
    (["inspect", "{tmp}/nothing"], "nothing: no manifest.json"),
])
def test_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "x.txt").write_text("some text\n")
    assert run(*(a.format(tmp=tmp_path) for a in argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("amos-ds: error: ") and message in err and err.count("\n") == 1


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("tokenizer", "train", "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--vocab-size" in out and "--lowercase" in out and "--output" in out
