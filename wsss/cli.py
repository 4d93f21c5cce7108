"""Command line: `python -m wsss SUBCOMMAND --help`.

Each pipeline stage is one subcommand whose flags are generated from the stage's config
dataclass (wsss.config), so the CLI, the notebooks and the tests call the same `run(cfg)`.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from wsss import config as C
from wsss.paths import REPO_ROOT, benchmark_root


def stage_commands() -> dict:
    """subcommand -> (module, its config class, one-line help): the pipeline's stages
    (wsss.stages.pipeline.STAGES) and the pipeline itself. Each module has the config
    dataclass (its fields carry their help: wsss.config.setting) and run(cfg) -> dict of metrics."""
    from wsss.stages import pipeline

    commands = {s.command: (s.module, s.config, s.help) for s in pipeline.STAGES.values()}
    commands["pipeline"] = (pipeline, pipeline.PipelineConfig,
                            "bring the stages above up to date, in order, from one YAML config")
    return commands


def _add_benchmark_parser(sub) -> None:
    p = sub.add_parser("make-benchmark", help="generate the embedded benchmark in VOC layout",
                       description="Generate the seeded synthetic multi-label benchmark (VOC layout) and print its statistics.")
    p.add_argument("--size", choices=["smoke", "demo", "full", "art-smoke", "art-demo", "art-full"], default="demo",
                   help="smoke / demo / full: generated shapes; art-*: VOC's 20 classes drawn from emoji artwork")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="output folder (default: data/synthetic-SIZE)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the shapes benchmarks (default 10)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None, help="training images (size 'full' needs it)")
    p.add_argument("--num-val", type=int, default=None)
    p.add_argument("--noise-rate", type=float, default=0.3, help="label noise of the 'web' split (setting 3)")
    p.add_argument("--body-class", type=float, default=None,
                   help="P(a body has its class pair's look), in [0, 1] (0: bodies say nothing about the class)")
    p.add_argument("--context-p", type=float, default=None, help="P(a present class draws its context band)")
    p.add_argument("--context-size", type=float, default=None, help="scale of the context bands (1: version 2's)")
    p.add_argument("--overwrite", action="store_true")


def _add_stats_parser(sub) -> None:
    p = sub.add_parser("stats", help="label and pair statistics of a VOC-layout dataset",
                       description="Print label frequency, co-occurrence and pair statistics of a dataset split.")
    p.add_argument("--root", default=None, help="dataset root (default: data/synthetic-demo)")
    p.add_argument("--split", default="train")
    p.add_argument("--p-common", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wsss", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment variable WSSS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("demo", help="the main job: the whole pipeline on the art benchmark (configs/demo.yaml)",
                       description="Generate the benchmark if missing, run classifier -> maps -> pseudo-masks -> "
                                   "segmenter -> evaluation, print the mIoU table and draw figures.")
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"), help="pipeline YAML (default: configs/demo.yaml)")
    p.add_argument("--run-dir", default=None,
                   help="override the config's run directory (relative paths go under runs/)")
    p.add_argument("--figures", default=None, help="folder for the figures (default: figures/)")
    _add_benchmark_parser(sub)
    _add_stats_parser(sub)
    for name, (_, cls, text) in stage_commands().items():
        C.command_line(sub.add_parser(name, help=text, description=text), cls)
    return parser


def print_dataset_statistics(root, split: str = "train", p_common: float = 1.0, seed: int = 0) -> dict:
    from wsss.data.pairs import format_statistics, pair_statistics
    from wsss.data.voc import VOCDataset

    ds = VOCDataset(root, split, with_mask=False)
    stats = pair_statistics(ds.labels, ds.class_names, p_common=p_common, seed=seed)
    print(f"dataset {root} split {split}: {len(ds)} images, {ds.num_classes} classes")
    print(format_statistics(stats, ds.class_names))
    return stats


def _make_benchmark(args) -> None:
    from wsss.data.synth import SCENE_KNOBS, generate

    scene = {k: getattr(args, k) for k in SCENE_KNOBS if getattr(args, k) is not None}
    root = args.root or benchmark_root(args.size, args.seed, scene)
    stats = generate(root, size=args.size, seed=args.seed, num_classes=args.num_classes, image_size=args.image_size,
                     num_train=args.num_train, num_val=args.num_val, noise_rate=args.noise_rate, overwrite=args.overwrite,
                     **scene)
    print(json.dumps(stats, indent=2, default=str))
    print_dataset_statistics(root)


def _demo(args) -> None:
    """The main job: the whole pipeline on the embedded demo benchmark, a result table and figures."""
    from wsss.stages import pipeline

    t0 = time.perf_counter()
    cfg = C.load_yaml(pipeline.PipelineConfig, args.config)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    result = pipeline.run(cfg)
    run_dir = Path(result["run_dir"])
    figures = draw_run_figures(run_dir, result["data_root"], Path(args.figures) if args.figures else REPO_ROOT / "figures",
                               prefix=Path(args.config).stem, config=_shown(args.config))
    print()
    print(pipeline.summary_table(run_dir))
    print("\nseconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())
          + f"; total {time.perf_counter() - t0:.0f} s")
    print(f"run directory: {run_dir}")
    print("figures: " + ", ".join(str(f) for f in figures))


def _shown(path) -> str:
    """A path as the user would type it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def draw_run_figures(run_dir: Path, data_root, out_dir: Path, prefix: str = "demo", n: int = 6,
                     config: str = "configs/demo.yaml") -> list[Path]:
    """The qualitative grid and the threshold sweep of a finished run, as PNGs in ``out_dir``."""
    from wsss import rundir as R
    from wsss import viz
    from wsss.data.voc import class_names

    source = f"`python -m wsss demo --config {config}` (wsss.cli.draw_run_figures, from {run_dir.name}/)"
    rows = viz.qualitative_rows(run_dir, data_root, n=n)
    out = [viz.save_figure(viz.qualitative_grid(rows, class_names(data_root)), out_dir / f"{prefix}_qualitative.png",
                           "image, ground truth, single-image CAM, the run's saved localization maps (its combine and k), "
                           "pseudo-mask and segmentation of the first training images", source)]
    metrics = json.loads((run_dir / R.SUMMARY).read_text())
    if "maps" in metrics and "sweep" in metrics["maps"]:
        out.append(viz.save_figure(viz.sweep_figure(metrics["maps"]["sweep"]), out_dir / f"{prefix}_threshold_sweep.png",
                                   "mIoU of the localization maps on train against the background threshold", source))
    return out


#: exit codes of ``main`` (documented in the README): what went wrong, by the kind of error
EXIT_CODES = {"config": 2, "data": 3, "run": 4, "disk": 5, "interrupted": 130}


def classify_error(err: BaseException) -> tuple[str, str] | None:
    """(kind, one- or two-line message) for the errors a user can fix; None for a bug."""
    from wsss.checkpoints import WeightsError
    from wsss.data.voc import DatasetError
    from wsss.engine import NonFiniteLossError

    if isinstance(err, KeyboardInterrupt):
        return "interrupted", "interrupted: finished work is kept; run the same command again to continue"
    if isinstance(err, DatasetError):
        return "data", str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "disk", (f"disk full while writing {err.filename or 'a file'}: free space and run the same command "
                        "again (finished files are complete; nothing half-written is kept)")
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "disk", f"cannot write {err.filename or 'a file'} ({os.strerror(err.errno)}): use a writable --run-dir"
    if isinstance(err, (NonFiniteLossError, WeightsError, FileNotFoundError)):
        return "run", str(err)
    if isinstance(err, ValueError):  # a ConfigError (a ValueError) or the stages' own checks of settings and inputs
        return "config", str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a known error prints one or two lines (no traceback) and returns
    its code from EXIT_CODES (``--debug`` or WSSS_DEBUG=1: the traceback instead)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    debug = args.debug or os.environ.get("WSSS_DEBUG", "").strip() not in ("", "0")
    try:
        return _dispatch(args, parser)
    except BaseException as err:  # noqa: BLE001 - sorted into known and unknown below
        known = classify_error(err) if not isinstance(err, SystemExit) else None
        if debug or known is None:
            raise
        kind, message = known
        print(f"error: {message}", file=sys.stderr)
        if kind != "interrupted":
            print("(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_CODES[kind]


def _dispatch(args, parser) -> int:
    if args.command == "demo":
        _demo(args)
    elif args.command == "make-benchmark":
        _make_benchmark(args)
    elif args.command == "stats":
        print_dataset_statistics(args.root or benchmark_root("demo"), args.split, args.p_common, args.seed)
    else:
        module, cls, _ = stage_commands()[args.command]
        metrics = module.run(C.from_args(cls, args, parser=parser))
        print(json.dumps(metrics, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
