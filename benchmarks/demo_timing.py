"""Time ``pipeline demo`` end to end, cold and warm, and print the per-stage table as Markdown.

    python benchmarks/demo_timing.py [--run-dir DIR] [--set section.key=value ...]

Cold: a fresh run directory (the demo videos are generated, features extracted, the detector
trained and evaluated). Warm: the same command again, which must reuse every cached stage.
The I3D weights are assumed to be in the user cache already (the first ``pipeline demo`` fetches them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def run_demo(run_dir: Path, sets: list[str]) -> tuple[float, str]:
    from pipeline.cli import main

    args = ["-q", "demo", "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = main(args)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"pipeline demo exited with {code}:\n{buf.getvalue()}")
    return seconds, buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=None, help="default: a temporary folder, removed after")
    p.add_argument("--set", action="append", default=[], dest="sets")
    a = p.parse_args()
    run_dir = a.run_dir or Path(tempfile.mkdtemp(prefix="wsvad-bench-"))
    try:
        cold, cold_out = run_demo(run_dir, a.sets)
        warm, _ = run_demo(run_dir, a.sets)
        latest = json.loads((run_dir / "latest.json").read_text())
        metrics = json.loads((run_dir / latest["evaluate"] / "metrics.json").read_text())
    finally:
        if a.run_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")
    print("\ncold run stage table:\n" + "\n".join(l for l in cold_out.splitlines() if l.strip()))
    print("\n| measure | value |\n|---|---|")
    print(f"| cold `pipeline demo` (s) | {cold:.1f} |")
    print(f"| warm `pipeline demo` (s) | {warm:.2f} |")
    print(f"| warm / cold | {warm / cold:.3%} |")
    print(f"| frame AUC | {metrics['auc']:.4f} |")
    print(f"| AP (average_precision_score) | {metrics['ap']:.4f} |")
    print(f"| per-class AUC | {', '.join(f'{k} {v:.3f}' for k, v in metrics['per_class_auc'].items())} |")


if __name__ == "__main__":
    main()
