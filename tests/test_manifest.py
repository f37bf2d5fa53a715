"""Manifest loader: valid rows load; each kind of bad row is a clear error naming file and line."""

from __future__ import annotations

import pytest

from pipeline.core.manifest import ManifestError, VideoRecord, load_manifest, write_manifest

HEADER = "id,path,split,label,class,intervals\n"


def write(tmp_path, body: str, files=("a.mp4", "b.mp4")):
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"x")
    m = tmp_path / "m.csv"
    m.write_text(HEADER + body)
    return m


def test_valid_manifest(tmp_path):
    m = write(tmp_path, "# a comment\na,a.mp4,train,1,Fighting,\nb,b.mp4,test,1,Fighting,10-20;40-55\n")
    man = load_manifest(m)
    assert [v.id for v in man.videos] == ["a", "b"]
    b = man.by_id()["b"]
    assert b.intervals == ((10, 20), (40, 55)) and b.cls == "Fighting"
    gt = b.frame_labels(60)
    assert sum(gt) == 10 + 15 and gt[10] == 1 and gt[20] == 0 and gt[54] == 1 and gt[55] == 0
    assert man.resolve(b) == tmp_path / "b.mp4"


def test_fingerprint_depends_only_on_chosen_columns(tmp_path):
    m1 = load_manifest(write(tmp_path, "a,a.mp4,test,1,X,10-20\n"))
    m2 = load_manifest(write(tmp_path, "a,a.mp4,test,1,X,10-30\n"))
    assert m1.fingerprint(("id", "path")) == m2.fingerprint(("id", "path"))
    assert m1.fingerprint() != m2.fingerprint()


@pytest.mark.parametrize(
    "body, message",
    [
        ("a,a.mp4,train,1,X,\na,b.mp4,train,0,Normal,\n", "m.csv:3: duplicate id 'a' (first on line 2)"),
        ("a,missing.mp4,train,1,X,\n", "m.csv:2: video 'missing.mp4' not found under data root"),
        ("a,../a.mp4,train,1,X,\n", "m.csv:2: path '../a.mp4' escapes the data root"),
        ("a,/etc/passwd,train,1,X,\n", "m.csv:2: path '/etc/passwd' is absolute"),
        ("a,a.mp4,test,1,X,20-10\n", "m.csv:2: bad interval '20-10'"),
        ("a,a.mp4,test,1,X,abc\n", "m.csv:2: bad interval 'abc'"),
        ("a,a.mp4,test,1,X,0-20;10-30\n", "overlap"),
        ("a,a.mp4,test,0,Normal,1-5\n", "normal video (label 0) has anomaly intervals"),
        ("a,a.mp4,train,2,X,\n", "m.csv:2: label '2' is not 0 or 1"),
        ("a,a.mp4,val,1,X,\n", "split 'val' is not one of"),
        ("a,a.mp4,train,1\n", "expected 6 columns, got 4"),
        ("a b,a.mp4,train,1,X,\n", "bad id 'a b'"),
    ],
)
def test_bad_rows(tmp_path, body, message):
    with pytest.raises(ManifestError) as e:
        load_manifest(write(tmp_path, body))
    assert message in str(e.value)


def test_bad_header_and_missing_file(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("id,path,label\n")
    with pytest.raises(ManifestError, match="m.csv:1: header must be"):
        load_manifest(m)
    with pytest.raises(ManifestError, match="nope.csv: manifest not found"):
        load_manifest(tmp_path / "nope.csv")


def test_write_then_load_round_trip(tmp_path):
    vids = [VideoRecord("a", "a.mp4", "train", 0, "Normal"), VideoRecord("b", "b.mp4", "test", 1, "X", ((3, 9),))]
    write(tmp_path, "")
    write_manifest(vids, tmp_path / "out.csv")
    assert load_manifest(tmp_path / "out.csv").videos == vids


def test_a_spreadsheet_byte_order_mark_is_read_and_latin1_is_a_clear_error(tmp_path):
    """Issue 19: a manifest saved as "CSV UTF-8" by a spreadsheet starts with a BOM, which made the
    header check fail with two headers that looked identical."""
    m = write(tmp_path, "a,a.mp4,train,1,Fighting,\n")
    m.write_bytes(b"\xef\xbb\xbf" + m.read_bytes())
    assert [v.id for v in load_manifest(m).videos] == ["a"]
    m.write_bytes(HEADER.encode() + "a,a.mp4,train,1,Caf\u00e9,\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="m.csv: not UTF-8 text"):
        load_manifest(m)
