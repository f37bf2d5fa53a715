"""Manifest builders on the real benchmark files in ``../shared/data``, plus synthetic edge cases.

Counts are the published splits (UCF-Crime: Sultani et al. 2018; ShanghaiTech as reorganised by Zhong et
al. 2019, RTFM paper Sec. 4.1; XD-Violence: Wu et al. 2020 and its dataset page); the ShanghaiTech
frame-level ground truth is compared with RTFM's ``gt-sh.npy``.
"""

from __future__ import annotations

import functools
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.datasets import (
    BUILDERS,
    BuildResult,
    build_manifest,
    mask_intervals,
    missing_report,
    padded_frame_labels,
)
from pipeline.datasets.ucf_crime import CLASSES as UCF_CLASSES
from pipeline.core.manifest import ManifestError, VideoRecord, load_manifest, write_manifest

FOLDERS = {"ucf-crime": "ucf_crime", "shanghaitech": "shanghaitech", "xd-violence": "xd_violence",
           "ucsd-ped2": "ucsd_ped2"}


@functools.lru_cache(maxsize=None)
def _build(name: str, root: str) -> BuildResult:
    return build_manifest(name, root)


def build_shared(shared: Path, name: str) -> BuildResult:
    return _build(name, str(shared / FOLDERS[name]))


def counts(videos: list[VideoRecord]) -> Counter:
    return Counter((v.split, v.label) for v in videos)


def check_intervals(v: VideoRecord, n_frames: int) -> None:
    assert v.intervals, v.id
    for s, e in v.intervals:
        assert 0 <= s < e <= n_frames, (v.id, s, e, n_frames)


def test_builders_registered():
    assert set(BUILDERS) == set(FOLDERS)
    with pytest.raises(ManifestError, match="unknown dataset"):
        build_manifest("avenue", ".")


# ------------------------------------------------------------------------------------------------
# Real files: counts, labels, classes, intervals


def test_ucf_crime(shared):
    r = build_shared(shared, "ucf-crime")
    assert counts(r.videos) == {("train", 1): 810, ("train", 0): 800, ("test", 1): 140, ("test", 0): 150}
    assert len({v.id for v in r.videos}) == 1900
    by_id = {v.id: v for v in r.videos}
    assert set(v.cls for v in r.videos) == set(UCF_CLASSES) | {"Normal"}
    assert all((v.cls == "Normal") == (v.label == 0) for v in r.videos)
    assert by_id["Abuse001_x264"].path == "Abuse/Abuse001_x264.mp4"
    assert by_id["Normal_Videos001_x264"].path == "Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4"
    assert by_id["Normal_Videos_003_x264"].path == "Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4"
    assert all(not v.intervals for v in r.videos if v.split == "train" or v.label == 0)
    # 1-based inclusive "1185 1485" -> 0-based [1184, 1485)
    assert by_id["Arrest001_x264"].intervals == ((1184, 1485),)
    assert by_id["Vandalism028_x264"].intervals == ((1829, 1980), (2399, 2670))
    # intervals lie inside the frame counts; ends past the count are cut there (Sultani's evaluation)
    frames = {}
    for line in (shared / "ucf_crime" / "UCF_Annotation_with_frame_counts.txt").read_text().splitlines():
        if line.strip():
            path, n = line.split()[:2]
            frames[Path(path).stem] = int(n)
    assert len(frames) == 290
    for v in r.videos:
        if v.split == "test" and v.label:
            check_intervals(v, frames[v.id])
    assert by_id["Assault006_x264"].intervals == ((1184, 8096),)  # ends exactly on its 8,096th frame
    assert by_id["Arson011_x264"].intervals == ((149, 420), (679, 1266))  # 1267 cut at 1,266 frames
    assert any("cut" in n and "Arson011_x264" in n for n in r.notes)
    assert len(r.missing) == 1900  # the shared folder holds annotations only


def test_shanghaitech(shared):
    r = build_shared(shared, "shanghaitech")
    assert counts(r.videos) == {("train", 1): 63, ("train", 0): 175, ("test", 1): 44, ("test", 0): 155}
    assert all(v.cls == ("Anomaly" if v.label else "Normal") for v in r.videos)
    # the mask rule agrees with Zhong's label column in the *_with_frame_counts files
    sh = shared / "shanghaitech"
    given = {}
    for f in ("SH_Train_with_frame_counts.txt", "SH_Test_with_frame_counts.txt"):
        for line in (sh / f).read_text().splitlines():
            if line.strip():
                name, label = line.split(",")[:2]
                given[name] = int(label)
    assert {v.id: v.label for v in r.videos} == given
    assert any("all agree" in n for n in r.notes)
    for v in r.videos:
        if v.split == "test" and v.label:
            mask = np.load(sh / "test_frame_mask" / f"{v.id}.npy")
            check_intervals(v, len(mask))
            assert np.array_equal(np.asarray(v.frame_labels(len(mask))), mask.astype(int))
        else:
            assert v.intervals == ()
    by_id = {v.id: v for v in r.videos}
    # names map to either half of the original release; missing ones keep its standard path
    assert by_id["01_0014"].path == "testing/frames/01_0014" and by_id["01_0014"].split == "train"
    assert by_id["01_001"].path == "training/videos/01_001.avi" and by_id["01_001"].split == "test"


def test_xd_violence(shared):
    r = build_shared(shared, "xd-violence")
    assert counts(r.videos) == {("train", 1): 1905, ("train", 0): 2049, ("test", 1): 500, ("test", 0): 300}
    test_violent = [v for v in r.videos if v.split == "test" and v.label]
    assert len(test_violent) == 500 and all(v.intervals for v in test_violent)
    assert all(not v.intervals for v in r.videos if v.split == "train" or not v.label)
    assert all(("_label_A" in v.id) == (v.label == 0) for v in r.videos)
    assert set(v.cls for v in r.videos) == {"Normal", "Fighting", "Shooting", "Riot", "Abuse", "CarAccident",
                                            "Explosion"}
    by_id = {v.id: v for v in r.videos}
    # first annotation line, unchanged: 0-based start, exclusive end
    assert by_id["v=S-7rRLrxnVQ__#1_label_B4-0-0"].intervals == ((0, 1517), (1970, 3038))
    assert by_id["v=S-7rRLrxnVQ__#1_label_B4-0-0"].cls == "Riot"
    assert by_id["Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6"].cls == "Explosion"
    assert any(c in v.id for v in r.videos for c in "#=&")
    assert by_id["Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6"].path == \
        "test/Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6.mp4"


def test_xd_violence_rgb_lists_give_the_same_manifest(shared, tmp_path):
    xd = shared / "xd_violence"
    for f in ("rgb.list", "rgb_test.list", "XD_Annotation.txt"):
        shutil.copy(xd / f, tmp_path / f)
    other = build_manifest("xd-violence", tmp_path)
    assert other.videos == build_shared(shared, "xd-violence").videos


def test_ucsd_ped2_split(shared):
    r = build_shared(shared, "ucsd-ped2")
    assert counts(r.videos) == {("train", 1): 6, ("train", 0): 12, ("test", 1): 6, ("test", 0): 4}
    by_id = {v.id: v for v in r.videos}
    assert [v.id for v in r.videos if v.split == "test"] == [f"Test{k:03d}" for k in range(2, 13, 2)] + \
        [f"Train{k:03d}" for k in range(13, 17)]
    # only the 12 test folders are shared: they are found, the 16 training clips are reported missing
    assert sorted(v.id for v in r.missing) == [f"Train{k:03d}" for k in range(1, 17)]
    assert by_id["Test001"].path == "testing/frames/01" and by_id["Test001"].intervals == ()
    # ped2.mat [95; 180] (1-based inclusive) -> [94, 180); Test008 is anomalous throughout
    assert by_id["Test002"].intervals == ((94, 180),)
    assert by_id["Test008"].intervals == ((0, 180),)
    for v in r.videos:
        if v.split == "test" and v.label:
            n = len(list((shared / "ucsd_ped2" / v.path).glob("*.jpg")))
            check_intervals(v, n)
    assert all("Test" in v.id for v in r.videos if v.label)


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_written_manifest_loads(shared, tmp_path, name):
    r = build_shared(shared, name)
    out = tmp_path / f"{name}.csv"
    write_manifest(r.videos, out)
    man = load_manifest(out, root=shared / FOLDERS[name], check_files=False)
    assert man.videos == r.videos


def test_gt_sh_matches_rtfm(shared):
    """Frame-level ground truth from the manifest vs RTFM's ``gt-sh.npy``, padded as RTFM list/make_gt_sh.py.

    The 197 first videos of RTFM's test list (142,816 frames) match exactly. The file then has only
    96 frames left for the last two, 13_005 and 13_006 (385 and 457 frames: 400 + 464 padded):
    RTFM builds its ground truth from its features' lengths, and for these two normal videos the
    features are shorter than the frame counts (make_gt_sh.py gives each video 16 x its feature
    length, and these two have fewer clips than ceil(L/16)). Those 96 frames are all normal, as is
    every frame of the two videos.
    """
    sh = shared / "shanghaitech"
    by_id = {v.id: v for v in build_shared(shared, "shanghaitech").videos}
    counts_ = {}
    for line in (sh / "SH_Test_with_frame_counts.txt").read_text().splitlines():
        if line.strip():
            name, _, n = line.split(",")
            counts_[name] = int(n)
    lines = (sh / "shanghai-i3d-test-10crop.list").read_text().splitlines()
    order = [Path(line.strip()).name[: -len("_i3d.npy")] for line in lines if line.strip()]
    assert len(order) == 199 and {by_id[n].split for n in order} == {"test"}
    parts = []
    for name in order:
        v = by_id[name]
        n = len(np.load(sh / "test_frame_mask" / f"{name}.npy")) if v.label else counts_[name]
        parts.append(padded_frame_labels(v, n))
    ours = np.concatenate(parts)
    gt = np.load(sh / "gt-sh.npy")
    assert gt.shape == (142_912,)
    head = sum(len(p) for p in parts[:-2])
    assert head == 142_816 and order[-2:] == ["13_005", "13_006"]
    assert np.array_equal(ours[:head], gt[:head].astype(np.uint8))
    assert len(gt) - head == 96 and not gt[head:].any() and not ours[head:].any()
    assert len(ours) == 143_680  # 400 + 464 frames for the last two by their frame counts


def test_padded_frame_labels():
    v = VideoRecord("a", "a.mp4", "test", 1, "X", ((3, 5), (18, 20)))
    out = padded_frame_labels(v, 20)
    assert out.dtype == np.uint8 and len(out) == 32
    assert out[:20].tolist() == v.frame_labels(20) and out[20:].tolist() == [1] * 12
    assert padded_frame_labels(v, 16).tolist() == v.frame_labels(16)
    assert len(padded_frame_labels(v, 0)) == 0
    assert padded_frame_labels(VideoRecord("b", "b", "test", 0, "Normal"), 5, clip_len=4).tolist() == [0] * 8


def test_mask_intervals():
    assert mask_intervals(np.array([1, 1, 0, 0, 1, 0, 1], np.uint8)) == ((0, 2), (4, 5), (6, 7))
    assert mask_intervals(np.zeros(4)) == ()


# ------------------------------------------------------------------------------------------------
# Finding videos under any layout, and reporting missing ones


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_ucf_found_and_missing(shared, tmp_path):
    root = tmp_path / "root"
    touch(root / "Anomaly-Videos-Part-1" / "Abuse" / "Abuse001_x264.mp4")
    touch(root / "x" / "y" / "Normal_Videos_003_x264.mp4")
    touch(root / "Arrest" / "Arrest001_x264.mp4")  # twice: the copy in the standard layout wins
    touch(root / "dupes" / "Arrest001_x264.mp4")
    touch(root / "frames" / "Burglary005_x264" / "000001.jpg")  # a frame folder
    r = build_manifest("ucf-crime", root, annotations=shared / "ucf_crime")
    by_id = {v.id: v for v in r.videos}
    assert len(r.videos) == 1900 and len(r.missing) == 1900 - 4
    assert by_id["Abuse001_x264"].path == "Anomaly-Videos-Part-1/Abuse/Abuse001_x264.mp4"
    assert by_id["Normal_Videos_003_x264"].path == "x/y/Normal_Videos_003_x264.mp4"
    assert by_id["Arrest001_x264"].path == "Arrest/Arrest001_x264.mp4"
    assert by_id["Burglary005_x264"].path == "frames/Burglary005_x264"
    assert by_id["Abuse002_x264"] in r.missing and by_id["Abuse002_x264"].path == "Abuse/Abuse002_x264.mp4"
    assert any("more than one place" in n for n in r.notes)
    report = "\n".join(missing_report(r, root))
    assert "1896 of 1900" in report and str(root) in report and "Abuse002_x264" in report
    assert "no listed video was found" not in report
    # the written manifest resolves the found videos under the root
    write_manifest(r.videos, tmp_path / "m.csv")
    man = load_manifest(tmp_path / "m.csv", root=root, check_files=False)
    assert {v.id for v in man.missing_files()} == {v.id for v in r.missing}


def test_shanghaitech_found_and_missing(shared, tmp_path):
    root = tmp_path / "sh"
    touch(root / "testing" / "frames" / "01_0014" / "000.jpg")
    touch(root / "videos" / "01_002.avi")
    r = build_manifest("shanghaitech", root, annotations=shared / "shanghaitech")
    by_id = {v.id: v for v in r.videos}
    assert len(r.missing) == 437 - 2
    assert by_id["01_0014"].path == "testing/frames/01_0014" and by_id["01_0014"] not in r.missing
    assert by_id["01_002"].path == "videos/01_002.avi" and by_id["01_002"] not in r.missing


def test_ucsd_ped2_layouts(shared, tmp_path):
    root = tmp_path / "ped2"
    touch(root / "UCSDped2" / "Train" / "Train003" / "001.tif")  # UCSD's own layout
    touch(root / "UCSDped2" / "Test" / "Test002" / "001.tif")
    touch(root / "ped2" / "testing" / "frames" / "05" / "000.jpg")  # '05' under testing: a test clip only
    shutil.copy(shared / "ucsd_ped2" / "ped2.mat", root / "ped2.mat")
    r = build_manifest("ucsd-ped2", root)
    by_id = {v.id: v for v in r.videos}
    assert by_id["Train003"].path == "UCSDped2/Train/Train003"
    assert by_id["Test002"].path == "UCSDped2/Test/Test002"
    assert by_id["Test005"].path == "ped2/testing/frames/05"
    assert by_id["Train005"] in r.missing and by_id["Train005"].path == "training/frames/05"
    assert len(r.missing) == 28 - 3
    # the one-frame placeholder folder is shorter than Test002's interval [94, 180): cut, and said so
    assert by_id["Test002"].intervals == () and by_id["Test002"].label == 1
    assert any("cut" in n and "Test002" in n for n in r.notes)


def test_all_missing_is_reported(shared, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = build_manifest("xd-violence", empty, annotations=shared / "xd_violence")
    assert len(r.missing) == len(r.videos) == 4754
    assert "no listed video was found" in "\n".join(missing_report(r, empty))


# ------------------------------------------------------------------------------------------------
# Malformed or missing annotation files


def _ucf_files(shared: Path, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in ("Anomaly_Train.txt", "Temporal_Anomaly_Annotation.txt"):
        shutil.copy(shared / "ucf_crime" / f, d / f)
    return d


def _replace_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _xd_files(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "XD_Train.list").write_text("".join(f"/f/A.b__#1_label_A__{c}.npy\n" for c in range(5)))
    (d / "XD_Test.list").write_text("/f/v=x__#2_label_B1-0-0__0.npy\n/f/v=y__#3_label_A__0.npy\n")
    (d / "XD_Annotation.txt").write_text("v=x__#2_label_B1-0-0 10 20\n")
    return d


@pytest.mark.parametrize("case", ["ucf-train-fields", "ucf-train-class", "ucf-test-int", "ucf-test-class",
                                  "ucf-test-order", "sh-label", "sh-name", "xd-odd", "xd-code", "xd-interval"])
def test_malformed_lines_name_file_and_line(shared, tmp_path, case):
    ann = tmp_path / "ann"
    root = tmp_path / "root"
    root.mkdir()
    if case.startswith("ucf"):
        _ucf_files(shared, ann)
        dataset = "ucf-crime"
        target, lineno, text = {
            "ucf-train-fields": ("Anomaly_Train.txt", 3, "Abuse/Abuse003_x264.mp4 extra"),
            "ucf-train-class": ("Anomaly_Train.txt", 5, "Picnic/Picnic005_x264.mp4"),
            "ucf-test-int": ("Temporal_Anomaly_Annotation.txt", 2, "Abuse030_x264.mp4  Abuse  1275  13x0  -1  -1"),
            "ucf-test-class": ("Temporal_Anomaly_Annotation.txt", 4, "Arrest007_x264.mp4  Picnic  1530  2160  -1  -1"),
            "ucf-test-order": ("Temporal_Anomaly_Annotation.txt", 7, "Arrest030_x264.mp4  Arrest  500  400  -1  -1"),
        }[case]
    elif case.startswith("sh"):
        ann.mkdir()
        (ann / "test_frame_mask").mkdir()
        (ann / "SH_Train.txt").write_text("01_001\n01_002\n")
        (ann / "SH_Test.txt").write_text("01_003\n01_004\n01_005\n01_006\n")
        dataset = "shanghaitech"
        target, lineno, text = {"sh-label": ("SH_Test.txt", 4, "01_006,7"),
                                "sh-name": ("SH_Train.txt", 2, "video two")}[case]
    else:
        _xd_files(ann)
        dataset = "xd-violence"
        target, lineno, text = {
            "xd-odd": ("XD_Annotation.txt", 1, "v=x__#2_label_B1-0-0 10 20 30"),
            "xd-code": ("XD_Test.list", 2, "/f/v=y__#3_label_B9-0-0__0.npy"),
            "xd-interval": ("XD_Annotation.txt", 1, "v=x__#2_label_B1-0-0 20 10"),
        }[case]
    _replace_line(ann / target, lineno, text)
    with pytest.raises(ManifestError) as err:
        build_manifest(dataset, root, annotations=ann)
    assert f"{ann / target}:{lineno}:" in str(err.value)


def test_duplicate_video_names_the_first_line(tmp_path):
    _xd_files(tmp_path)
    (tmp_path / "XD_Test.list").write_text("/f/v=x__#2_label_B1-0-0__0.npy\n/f/A.b__#1_label_A__0.npy\n")
    message = r"XD_Test.list:2: video 'A.b__#1_label_A' listed twice \(first at .*XD_Train.list:1\)"
    with pytest.raises(ManifestError, match=message):
        build_manifest("xd-violence", tmp_path)


def test_unreadable_files(shared, tmp_path):
    ann = _ucf_files(shared, tmp_path / "ucf")
    (ann / "Anomaly_Train.txt").write_bytes(b"Abuse/Abuse001_x264.mp4\n\xff\xfe\x00garbage\n")
    with pytest.raises(ManifestError, match=re.escape(str(ann / "Anomaly_Train.txt")) + ": not UTF-8"):
        build_manifest("ucf-crime", ann)
    # a frame mask that is not a 1-D 0/1 array
    sh = tmp_path / "sh"
    (sh / "test_frame_mask").mkdir(parents=True)
    (sh / "SH_Train.txt").write_text("01_001\n")
    (sh / "SH_Test.txt").write_text("01_0014\n")
    np.save(sh / "test_frame_mask" / "01_0014.npy", np.zeros((3, 4)))
    with pytest.raises(ManifestError, match=re.escape(str(sh / "test_frame_mask" / "01_0014.npy")) + ": .*1-D"):
        build_manifest("shanghaitech", sh)
    # a .mat whose gt entries are not [start; end] pairs
    import scipy.io

    p2 = tmp_path / "p2"
    p2.mkdir()
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0], cells[0, 1] = np.array([[1], [5]]), np.array([[1], [2], [3]])
    scipy.io.savemat(p2 / "ped2.mat", {"gt": cells})
    with pytest.raises(ManifestError, match=re.escape(str(p2 / "ped2.mat")) + ": gt entry 2"):
        build_manifest("ucsd-ped2", p2)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(ManifestError, match=r"no Anomaly_Train.txt found in --root"):
        build_manifest("ucf-crime", tmp_path)
    with pytest.raises(ManifestError, match="not a folder"):
        build_manifest("ucf-crime", tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_manifest_build(shared, tmp_path, capsys, monkeypatch):
    root = shared / "ucsd_ped2"
    out = tmp_path / "ped2.csv"
    assert main(["-q", "manifest", "build", "ucsd-ped2", "--root", str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote 28 videos" in captured.out and "12 found, 16 missing" in captured.out
    assert re.search(r"train\s+6\s+12\s+18", captured.out) and re.search(r"test\s+6\s+4\s+10", captured.out)
    assert "16 of 28 listed videos not found under" in captured.err and "Train001" in captured.err
    man = load_manifest(out, root=root, check_files=False)
    assert len(man.videos) == 28 and len(man.missing_files()) == 16
    with pytest.raises(ManifestError, match="not found under data root"):
        load_manifest(out, root=root, check_files=True)
    # default output ./<dataset>.csv, annotations from another folder
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "manifest", "build", "shanghaitech", "--root", str(tmp_path),
                 "--annotations", str(shared / "shanghaitech")]) == 0
    assert len(load_manifest(tmp_path / "shanghaitech.csv", check_files=False).videos) == 437
    assert "no listed video was found" in capsys.readouterr().err


def test_cli_malformed_annotation_exits_2(shared, tmp_path, capsys):
    ann = _ucf_files(shared, tmp_path / "ann")
    _replace_line(ann / "Temporal_Anomaly_Annotation.txt", 3, "Arrest001_x264.mp4  Arrest  1185")
    code = main(["-q", "manifest", "build", "ucf-crime", "--root", str(tmp_path), "--annotations", str(ann),
                 "--out", str(tmp_path / "u.csv")])
    assert code == 2
    assert f"{ann / 'Temporal_Anomaly_Annotation.txt'}:3:" in capsys.readouterr().err
    assert not (tmp_path / "u.csv").exists()
