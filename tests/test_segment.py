"""The segment stage's bins against the official scripts' loops, written out here index by index."""

import math

import numpy as np
import pytest

from stages.segment import pool_segments, segment_bins


def matlab_round(x: float) -> int:
    return int(math.floor(x + 0.5))  # MATLAB's round, halves away from zero (x >= 0 here)


def sultani_script_bins(n: int) -> list[list[int]]:
    """0-based clip indices of each segment, as Save_C3DFeatures_32Segments.m's loop picks them:
    1-based edges round(linspace(1, n, 33)); segment i covers ss..ee = e_i..e_{i+1}-1, or clip ss
    alone when ee <= ss; the branch for ishots == 33 never runs (the loop stops at 32)."""
    edges = [matlab_round(1 + (n - 1) * i / 32) for i in range(33)]
    out = []
    for i in range(32):
        ss, ee = edges[i], edges[i + 1] - 1
        clips = [ss] if ee <= ss else list(range(ss, ee + 1))
        out.append([c - 1 for c in clips])
    return out


@pytest.mark.parametrize("n", [1, 2, 17, 18, 33, 40, 100, 257])
def test_sultani_bins_equal_the_official_loop(n):
    bins = segment_bins(n, 32, "sultani")
    assert [list(range(a, b)) for a, b in bins] == sultani_script_bins(n)


def test_sultani_last_segment_leaves_out_the_last_clip():
    # 40 clips: 1-based edges ... 39, 40; the last segment is clip 39 (1-based) alone, clip 40 unused
    bins = segment_bins(40, 32, "sultani")
    assert bins[-1] == (38, 39)
    assert max(b for _, b in bins) == 39


def test_rtfm_bins_by_hand():
    # int(linspace(0, 40, 33)): 0, 1, 2, 3, 5, 6, 7, 8, 10, ...; segment 3 is clips 3-4
    bins = segment_bins(40, 32, "rtfm")
    assert bins[:5] == [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6)]
    assert bins[-1] == (38, 40)


def test_pool_segments_mean_then_unit_norm():
    feats = np.zeros((3, 1, 2), np.float32)
    feats[:, 0, 0] = [1.0, 3.0, 3.0]
    feats[:, 0, 1] = [0.0, 0.0, 4.0]
    seg = pool_segments(feats, [(0, 2), (2, 3)], l2=True)
    np.testing.assert_allclose(seg[0], [[1.0, 0.0], [0.6, 0.8]], atol=1e-7)


def test_auto_scheme_follows_the_detector():
    from stages.config import build_config

    assert build_config(method="rtfm").segment.scheme == "rtfm"
    assert build_config(method="sultani_mil").segment.scheme == "sultani"
    assert build_config(method="rtfm", sets=["segment.scheme=sultani"]).segment.scheme == "sultani"
