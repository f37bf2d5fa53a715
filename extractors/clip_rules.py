"""How a video is cut into clips, and what fills a trailing partial clip (``extract.partial_clip``).

Clip i covers frames ``[L i, L i + L)`` (``L = extract.clip_len``, 16: non-overlapping windows as the
public features; RTFM issue 2; UR-DMU ``feature_extract/i3d_extract.py``). The rules for the frames
after the last full clip, each the one a public feature set was made with:

- ``pad``: a partial clip is kept, its missing frames repeat its last real frame (RTFM issue 53;
  UR-DMU's ``i3d_extract.py``); ``ceil(n / L)`` clips.
- ``cycle``: a partial clip is kept, filled by cycling its own frames (frame ``t`` of the clip is real
  frame ``t mod m`` of its ``m``): Tushar-N/pytorch-resnet3d's test loader, which RTFM's ResNet-50 I3D
  features came from (``utils/gtransforms.py`` ``LoopPad``); ``ceil(n / L)`` clips.
- ``drop``: a partial clip is dropped; ``floor(n / L)`` clips (Sultani et al.'s C3D features, whose
  extractor takes whole 16-frame clips only).
- ``exclude_last_frame``: ``(n - 1) // L`` clips: the partial clip is dropped and the video's last
  frame is never used, so a video of exactly ``k L`` frames gives ``k - 1`` clips (the Roc-Ng /
  XD-Violence Inception-I3D files; the count their readers assume).
"""

from __future__ import annotations

#: values of ``extract.partial_clip`` (module docstring)
PARTIAL_CLIP_RULES = ("pad", "cycle", "drop", "exclude_last_frame")


def check_rule(rule: str) -> None:
    """Raise ValueError for an unknown ``extract.partial_clip``."""
    if rule not in PARTIAL_CLIP_RULES:
        raise ValueError(f"unknown extract.partial_clip {rule!r}; rules: {', '.join(PARTIAL_CLIP_RULES)}")


def clip_count(n_frames: int, clip_len: int, rule: str) -> int:
    """Clips a video of ``n_frames`` frames gives under ``rule`` (module docstring)."""
    check_rule(rule)
    if rule == "exclude_last_frame":
        return max(0, n_frames - 1) // clip_len
    if rule == "drop":
        return n_frames // clip_len
    return -(-n_frames // clip_len)


def clip_ranges(n_frames: int, clip_len: int, rule: str) -> list[tuple[int, int]]:
    """Each clip's real frame range ``[i L, min((i + 1) L, n_frames))`` under ``rule`` (no resampling)."""
    return [(i * clip_len, min((i + 1) * clip_len, n_frames)) for i in range(clip_count(n_frames, clip_len, rule))]


def fill_order(n_real: int, clip_len: int, rule: str) -> list[int]:
    """Index, among a clip's ``n_real`` real frames, of each of its ``clip_len`` input frames:
    ``0 .. n_real - 1`` then the last one repeated (``pad``) or the clip's frames again (``cycle``)."""
    if not 0 < n_real <= clip_len:
        raise ValueError(f"a clip holds 1..{clip_len} real frames, not {n_real}")
    if rule == "cycle":
        return [t % n_real for t in range(clip_len)]
    return [min(t, n_real - 1) for t in range(clip_len)]


def keeps_partial(rule: str) -> bool:
    """True when ``rule`` keeps a trailing partial clip (``pad``, ``cycle``)."""
    check_rule(rule)
    return rule in ("pad", "cycle")
