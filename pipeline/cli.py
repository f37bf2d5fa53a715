"""The ``pipeline`` command line.

    pipeline run --stage {extract,segment,train,evaluate,all} [--method NAME] [--config FILE]
                 [--set a.b=c ...] [--force] [--run-dir DIR]
    pipeline status [--run-dir DIR] [same config options]
    pipeline demo [--run-dir DIR] [--set a.b=c ...]
    pipeline manifest build {ucf-crime,shanghaitech,xd-violence,ucsd-ped2} --root DIR [--annotations DIR] [--out FILE]
    pipeline import-features --format {rtfm,roc-ng,sultani} --root DIR --manifest FILE [--run-dir DIR]
    pipeline score VIDEO... --run-dir DIR [--out DIR] [--online]
    pipeline list
    pipeline config [same config options]

Exit status: 0 success; 1 some videos or stages failed (a summary lists them); 2 bad usage or
configuration (nothing was run).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")

STAGE_CHOICES = ("flow", "extract", "segment", "train", "evaluate", "all")  # flow: precompute TV-L1 alone


def _feature_presets() -> tuple[str, ...]:
    """``extract.preset``'s values, from the config field's choices (the core config is light to import,
    where ``extractors.presets`` would import every network for ``pipeline --help``)."""
    import dataclasses

    from pipeline.core.config import ExtractConfig

    return next(f for f in dataclasses.fields(ExtractConfig) if f.name == "preset").metadata["choices"]


FEATURE_PRESETS = _feature_presets()


def _add_config_args(p: argparse.ArgumentParser, run_dir_default: str = "runs/default",
                     training_preset: bool = True) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config file (may be repeated; later files override earlier ones)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="sets",
                   help="override one setting, e.g. --set train.lr=0.002 (may be repeated)")
    p.add_argument("--method", default=None, help="detector to train (pipeline list); sets train.method")
    if training_preset:
        p.add_argument("--preset", default=None, choices=("quick",),
                       help="quick: a short training schedule for a small dataset or a CPU (400 steps with the "
                            "detector's documented short settings; MIST stage II 4 epochs), under --config and "
                            "--set; not for the published numbers, whose schedules stay the defaults "
                            "(stages/config.py)")
    p.add_argument("--run-dir", default=run_dir_default, type=Path,
                   help=f"where the run's config, cache and reports live (default: {run_dir_default})")


def _version() -> str:
    """The installed distribution's version (pyproject.toml), or 'unknown' when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsvad-pipeline")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Weakly supervised video anomaly detection: extract -> segment -> train -> evaluate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # -q / -v also after the command (`pipeline run -q ...`); SUPPRESS keeps a flag given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings only, no progress bars")
    common.add_argument("--store", type=Path, default=None, metavar="DIR",
                        help="folder of per-video artifacts (features, flow, segments) shared by runs and manifests "
                             "(default: $WSVAD_STORE, else ~/.cache/wsvad-pipeline/store, the XDG cache folder)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run a stage and whatever it needs that is not up to date",
                         description="Run a stage (and its out-of-date upstream stages). Finished work "
                         "is reused from the cache; a rerun after a crash resumes.")
    run.add_argument("--stage", choices=STAGE_CHOICES, default="all", help="stage to run (default: all)")
    run.add_argument("--force", action="store_true", help="recompute the named stage(s) even if cached")
    _add_config_args(run)

    st = sub.add_parser("status", parents=[common], help="show each stage's state (done / partial / stale / missing) and why",
                        description="Starts from the config the last run in the run directory saved "
                        "(RUN_DIR/config.yaml) unless --config is given; --set and --method apply on top "
                        "(with another --method, the saved training settings are left out).")
    _add_config_args(st)

    demo = sub.add_parser("demo", parents=[common], help="generate the demo dataset and run every stage on it (CPU, minutes)",
                          description="Runs all stages on the generated demo dataset with the demo preset "
                          "(pipeline/demo/demo.yaml), then prints the frame-level AUC and the report's path.")
    demo.add_argument("--force", action="store_true", help="recompute every stage")
    _add_config_args(demo, run_dir_default="runs/demo")

    feat = sub.add_parser("features", parents=[common], help="check this project's features against a feature file",
                          description="Tools for feature files.")
    feat_sub = feat.add_subparsers(dest="features_command", required=True, metavar="ACTION")
    fc = feat_sub.add_parser(
        "compare", parents=[common], help="extract a video and compare its features with a file, clip by clip",
        description="Extract VIDEO with the extract settings (--config/--set, as `run`) and compare its features with "
                    "FEATURES ([T, D] or [T, C, D] .npy): clip counts, per clip and crop the cosine similarity and "
                    "relative L2, and a verdict (match: relative L2 below --tolerance everywhere). Exit 0 match, "
                    "1 mismatch, 2 not comparable. See pipeline/features.py.")
    fc.add_argument("features", type=Path, help="the feature file to check against (e.g. a published one)")
    fc.add_argument("video", type=Path, help="the video (file or JPEG frame folder) it was made from")
    fc.add_argument("--crop", type=int, default=None,
                    help="with a one-crop file and several extracted crops: which extracted crop (default 0, the centre)")
    fc.add_argument("--tolerance", type=float, default=1e-2,
                    help="largest relative L2 that counts as a match (default 1e-2: issue 17's criterion)")
    fc.add_argument("--out", type=Path, default=None, help="write every clip's and crop's figures to this CSV")
    fc.add_argument("--preset", default=None, choices=FEATURE_PRESETS, dest="feature_preset",
                    help="extract as this public feature set was made (sets extract.preset, under --config/--set; "
                    "extractors/presets.py): rtfm, xd_violence, sultani, or default")
    _add_config_args(fc, training_preset=False)

    man = sub.add_parser("manifest", parents=[common], help="build a manifest from a benchmark's own annotation files",
                         description="Build a manifest (data_manifests/README.md) for a downloaded benchmark.")
    man_sub = man.add_subparsers(dest="manifest_command", required=True, metavar="ACTION")
    mb = man_sub.add_parser("build", parents=[common], help="read a dataset's split/annotation files and write a manifest",
                            description="Read a dataset's own split and annotation files and write a manifest; "
                            "videos listed but missing under --root are reported.")
    mb.add_argument("dataset", choices=("ucf-crime", "shanghaitech", "xd-violence", "ucsd-ped2"))
    mb.add_argument("--root", required=True, type=Path, help="the dataset's folder (videos / frame folders)")
    mb.add_argument("--annotations", type=Path, default=None,
                    help="folder holding the split and annotation files (default: searched under --root)")
    mb.add_argument("--out", type=Path, default=None, help="manifest to write (default: ./<dataset>.csv)")

    imp = sub.add_parser("import-features", parents=[common], help="register published precomputed features as extracted features",
                         description="Read published feature files (RTFM [T,10,2048] .npy; Roc-Ng per-crop "
                         "__0..__9 .npy; Sultani 32x4096 .txt) for every video of a manifest and store them as the "
                         "extract stage's artifacts, so that segment, train and evaluate run on them unchanged.")
    imp.add_argument("--format", required=True, choices=("rtfm", "roc-ng", "sultani"), dest="import_format")
    imp.add_argument("--root", required=True, type=Path, help="folder holding the feature files (searched recursively)")
    imp.add_argument("--manifest", required=True, type=Path, help="the dataset's manifest")
    imp.add_argument("--data-root", default=None, help="data root of the manifest's video paths (default: its folder)")
    imp.add_argument("--force", action="store_true", help="re-import even if already imported")
    _add_config_args(imp, run_dir_default="runs/default")

    score = sub.add_parser("score", parents=[common], help="score new videos with a trained run (per-frame CSV/JSON + plot)",
                           description="Score videos or frame folders with the extractor and trained detector "
                           "of an existing run directory.")
    score.add_argument("videos", nargs="+", type=Path, help="video files or JPEG/PNG frame folders")
    score.add_argument("--run-dir", required=True, type=Path, help="a run directory with a trained detector")
    score.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/scores)")
    score.add_argument("--method", default=None,
                       help="which of the run's trained detectors scores (the latest trained with that method; "
                       "default: the latest trained detector, whatever its method)")
    score.add_argument("--online", action="store_true",
                       help="emit scores clip by clip while decoding (causal detectors only)")
    score.add_argument("--preset", default=None, choices=FEATURE_PRESETS,
                       help="the feature preset the detector's features were made with (extractors/presets.py); "
                       "a run trained on imported features uses the preset of its format without it; a preset "
                       "that would give other features is refused")
    score.add_argument("--weights", default=None, metavar="PATH",
                       help="local weights file of the extractor (e.g. Tushar-N's i3d_r50_kinetics.pth for preset "
                       "rtfm); for a run's own features it must be the file they were extracted with")

    mig = sub.add_parser("migrate", parents=[common], help="move a run directory's per-video items into the shared store",
                         description="A run directory made before the shared store kept its per-video items (features, "
                         "flow, segments) inside it; this moves them into the store (--store) and renames the folders "
                         "of the later stages, so that the next run computes nothing again. Uses the run's saved config.")
    _add_config_args(mig)

    sub.add_parser("list", parents=[common], help="list registered extractors and detectors",
                   description="List the registered extractors and detectors.")

    cfg = sub.add_parser("config", parents=[common], help="print the resolved configuration with each key's meaning",
                         description="Print the resolved configuration (defaults + files + --set). With "
                         "an existing --run-dir and no --config, starts from the config its last run saved, "
                         "as status does.")
    _add_config_args(cfg)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _resolve(args: argparse.Namespace, preset: list[dict[str, Any]] | None = None, use_saved: bool = False):
    from pipeline.core.config import load_yaml
    from stages.config import build_config

    layers = list(preset or [])
    saved = args.run_dir / "config.yaml"
    if use_saved and not args.config and saved.is_file():
        layer = load_yaml(saved)
        if args.method and str((layer.get("train") or {}).get("method")) != args.method:
            # the saved train section holds another detector's settings: keep the data, extract and
            # segment sections, and take --method's own training defaults
            layer = {k: v for k, v in layer.items() if k != "train"}
        layers.append(layer)
    layers += [load_yaml(f) for f in args.config]
    if getattr(args, "preset", None):
        from stages.config import preset_layer

        method = build_config(layers, args.sets, args.method).train.method  # the detector the preset shortens
        layers.insert(0, preset_layer(args.preset, method))
    return build_config(layers, args.sets, args.method)


def demo_preset() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(resources.files("pipeline.demo").joinpath("demo.yaml").read_text())


def _print_reports(reports: list) -> int:
    failed = []
    w = max([10] + [len(r.stage) for r in reports])  # mist_generator, mist_explain, ... stay aligned
    print(f"\n{'stage':<{w}} {'state':<9} {'computed':>8} {'cached':>7} {'failed':>7} {'seconds':>8}")
    for r in reports:
        print(f"{r.stage:<{w}} {r.state:<9} {r.computed:>8} {r.cached:>7} {len(r.failed):>7} {r.seconds:>8.1f}")
        failed += r.failed
    for r in reports:
        if r.stage == "evaluate" and r.summary.get("auc") is not None:
            print(f"\nframe-level AUC: {r.summary['auc']:.4f}   AP: {r.summary['ap']:.4f}   FAR@0.5: {r.summary['far']:.4f}" + (f"   FAR@{r.summary['threshold']:.3g} (training-chosen): {r.summary['far_at_threshold']:.4f}" if r.summary.get("threshold_rule") == "train_youden" and r.summary.get("far_at_threshold") is not None else ""))
            print(f"report:  {r.summary['report']}\nmetrics: {r.summary['metrics']}")
    if failed:
        print(f"\n{len(failed)} failure(s):")
        for f in failed:
            print(f"  [{f['stage']}] {f['video']}: {f['error']}")
        return 1
    return 0


def cmd_run(args: argparse.Namespace, preset: list[dict[str, Any]] | None = None) -> int:
    from pipeline.core.runner import Runner
    from pipeline.runs import make_context
    from stages import STAGE_NAMES, all_stages

    from pipeline.core import distributed

    cfg = _resolve(args, preset)
    from pipeline.core.config import ConfigError, check_devices
    from pipeline.core.errors import StageError
    from pipeline.core.runner import check_writable

    check_devices(cfg)  # a device this machine lacks is a configuration error: exit 2, before any work
    ctx = make_context(cfg, args.run_dir, progress=not args.quiet, store=getattr(args, "store", None))
    _ = ctx.manifest  # validate the manifest before any work
    try:
        check_writable(args.run_dir)  # a read-only run directory: one line, exit 2, before any work
    except StageError as e:
        raise ConfigError(str(e)) from None
    runner = Runner(ctx, all_stages())
    try:
        runner.check_layout()  # a run directory of the layout before the store: exit 2, before any work
    except StageError as e:
        raise ConfigError(str(e)) from None
    dist = distributed.from_env()  # under torchrun: this process's rank (see pipeline/core/distributed.py)
    if dist is not None and not dist.is_main:
        ctx.progress = False
    runner = Runner(ctx, all_stages(), dist=dist)
    targets = list(STAGE_NAMES) if args.stage == "all" else [args.stage]
    t0 = time.time()
    try:
        reports = runner.run(targets, force=set(targets) if args.force else set())
    finally:
        if dist is not None:
            dist.close()
    if dist is not None and not dist.is_main:
        return 0  # rank 0 prints the job's summary and exits non-zero for every rank's failures
    code = _print_reports(reports)
    print(f"run directory: {args.run_dir}   ({time.time() - t0:.1f} s)")
    return code


def cmd_import(args: argparse.Namespace) -> int:
    """``import-features``: the extract stage in import mode, then the command that trains on it."""
    imported = [
        f"data.manifest={args.manifest}",
        f"extract.import_format={args.import_format}",
        f"extract.import_root={args.root.resolve()}",
    ]
    if args.data_root:
        imported.append(f"data.root={args.data_root}")
    args.sets = imported + args.sets
    args.stage = "extract"
    code = cmd_run(args)
    sets = " ".join(f"--set {s}" for s in imported)
    print(f"\nnext: pipeline run --stage all --run-dir {args.run_dir} --config {args.run_dir / 'config.yaml'}")
    print(f"  (or add these settings to your own config: {sets})")
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.core.errors import StageError
    from pipeline.core.runner import Runner
    from pipeline.core.status import stage_status
    from pipeline.runs import make_context
    from stages import all_stages

    if not args.run_dir.is_dir():
        # a mistyped run directory is not a run that was "never run"
        from pipeline.core.config import ConfigError

        raise ConfigError(f"{args.run_dir}: no such run directory")
    cfg = _resolve(args, use_saved=True)
    runner = Runner(make_context(cfg, args.run_dir, progress=False, store=getattr(args, "store", None)), all_stages())
    try:
        runner.check_layout()
    except StageError as e:  # the earlier layout: say how to migrate rather than call its stages missing
        print(f"note: {e}")
    for row in stage_status(runner):
        print(f"{row['stage']:<10} {row['state']:<8} {row['why']}")
        if row.get("path") and row["state"] in ("done", "partial"):
            print(f"{'':<19} {row['path']}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline.core.config import ConfigError
    from pipeline.core.migrate import migrate_run
    from pipeline.core.runner import Runner
    from pipeline.runs import make_context
    from stages import all_stages

    if not (args.run_dir / "config.yaml").is_file():
        raise ConfigError(f"{args.run_dir}: not a run directory (no config.yaml)")
    cfg = _resolve(args, use_saved=True)
    runner = Runner(make_context(cfg, args.run_dir, progress=False, store=getattr(args, "store", None)), all_stages())
    counts = migrate_run(runner)
    print(f"migrated {args.run_dir}: {counts['items']} per-video items moved into {runner.ctx.store}, "
          f"{counts['stage_folders']} stage folders updated")
    if counts["unmigrated"]:
        print(f"  {counts['unmigrated']} items of videos the manifest no longer lists: kept in {args.run_dir / 'unmigrated'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from extractors import EXTRACTORS
    from extractors.presets import PRESETS
    from models import DETECTORS

    print("extractors:")
    for name in EXTRACTORS.list():
        cls = EXTRACTORS.get_class(name)
        print(f"  {name:<18} {cls.feature_dim}-D, {cls.clip_len}-frame clips, {cls.crop_size}px crops")
    print("feature presets (extract.preset):")
    for name, p in PRESETS.items():
        print(f"  {name:<18} {p.reproduces} ({p.settings['backbone']})")
    print("detectors:")
    for name in DETECTORS.list():
        cls = DETECTORS.get_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<18} {doc}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pipeline.core.config import describe

    cfg = _resolve(args, use_saved=True)
    if not args.config and (args.run_dir / "config.yaml").is_file():
        print(f"# from {args.run_dir / 'config.yaml'} (the run directory's saved config), then --set / --method")
    print(f"train.method = {cfg.train.method}")
    for key, value, doc in describe(cfg):
        print(f"{key} = {value!r}" + (f"    # {doc}" if doc else ""))
    return 0


def flush_denormals() -> None:
    """Flush denormal floats to zero on the CPU for the whole process (``torch.set_flush_denormal``:
    SSE's FTZ/DAZ), before torch starts its thread pool, which inherits the setting.

    Why: a detector whose weights or optimiser state drift below 1.2e-38 otherwise slows down step
    after step on the CPU. Measured with ``pipeline demo`` (Sultani MIL, 1,000 steps; 2-core Intel
    Xeon, torch 2.14.1, 2026-12-02): training 298 s without (9.6 steps/s falling to 3.9), 11.6 s with;
    the 30 videos' features byte-identical (benchmarks/compare_features.py) and the frame AUC the same
    (0.8941). GPU kernels flush denormals in training already."""
    import torch

    torch.set_flush_denormal(True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    flush_denormals()
    from pipeline.core.config import ConfigError
    from pipeline.core.manifest import ManifestError
    from pipeline.core.registry import RegistryError
    from pipeline.core.errors import StageError

    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "demo":
            args.stage = "all"
            return cmd_run(args, preset=[demo_preset()])
        if args.command == "status":
            return cmd_status(args)
        if args.command == "migrate":
            return cmd_migrate(args)
        if args.command == "manifest":
            from pipeline.datasets import cmd_manifest_build

            return cmd_manifest_build(args)
        if args.command == "features":
            from pipeline.features import cmd_features_compare

            if args.feature_preset:  # first, so that any --set still overrides it
                args.sets = [f"extract.preset={args.feature_preset}", *args.sets]
            return cmd_features_compare(args, _resolve(args))
        if args.command == "import-features":
            return cmd_import(args)
        if args.command == "score":
            from pipeline.score import cmd_score

            return cmd_score(args)
        if args.command == "list":
            return cmd_list(args)
        if args.command == "config":
            return cmd_config(args)
    except (ConfigError, ManifestError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`pipeline config | head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 2


if __name__ == "__main__":
    sys.exit(main())
