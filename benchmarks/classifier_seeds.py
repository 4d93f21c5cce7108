"""The shapes classifier (configs/shapes.yaml's classifier section) trained for its full length
per seed and setting; prints and writes a markdown table of the val mAP after chosen epochs
of each run (the last: the final mAP) and the gap of the final mAP to the first setting,
the baseline.

    python benchmarks/classifier_seeds.py --name selfpair --seeds 0 1 2 3 4 \\
        --setting none:loss.self_pairs=false --setting ours:loss.self_pairs=true
    python benchmarks/classifier_seeds.py --name backbones --seeds 0 1 2 --epochs-shown 1 3 10 \\
        --setting tiny: --setting lite0_imagenet:backbone=efficientnet_lite0,pretrained=imagenet,lr=0.001

Also drawn: runs/NAME/val_map.png, the val mAP after each epoch per setting.

Each run is an ordinary run directory under runs/NAME/SETTING_sSEED: a finished run is kept
(re-running the script only trains what is missing), an interrupted one resumes. Seeds run
in the outer loop, so that an interrupted grid has whole seeds of every setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from _settings import parse_setting

from wsss import config as C
from wsss.data.synth import ensure_benchmark
from wsss.paths import REPO_ROOT, benchmark_root, runs_dir
from wsss.stages import train_classifier as T


def val_map_after(metrics: dict, epoch: int) -> float | None:
    """The val mAP recorded at the end of ``epoch`` in a run's metrics history."""
    return next((r["val/map"] for r in metrics["history"] if r["epoch"] == epoch and "val/map" in r), None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--name", default="classifier_seeds", help="the grid's folder under runs/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--setting", action="append", required=True, help="NAME:field=value,...")
    parser.add_argument("--epochs-shown", type=int, nargs="+", default=[],
                        help="also show the val mAP after these epochs of each run")
    args = parser.parse_args(argv)
    pipe = yaml.safe_load(open(args.config))
    size = pipe.get("benchmark", "demo")
    root = ensure_benchmark(benchmark_root(size), size=size, seed=0)
    settings = dict(map(parse_setting, args.setting))
    results: dict[str, dict[int, dict]] = {name: {} for name in settings}
    for seed in args.seeds:
        for name, overrides in settings.items():
            section = {**pipe.get("classifier", {}), **overrides}
            cfg = C.from_dict(T.ClassifierConfig, {**section, "data_root": str(root), "seed": seed,
                                                   "run_dir": str(runs_dir() / args.name / f"{name}_s{seed}")})
            metrics = T.run(cfg)
            results[name][seed] = metrics
            print(json.dumps({"setting": name, "seed": seed, "val_map": metrics["val_map"],
                              "seconds_per_epoch": metrics["seconds_per_epoch"]}), flush=True)
    baseline = next(iter(results))
    shown = [e for e in args.epochs_shown if e < max(m["epochs"] for r in results.values() for m in r.values())]
    lines = ["| setting | s / epoch | " + " | ".join(f"after epoch {e}" for e in shown)
             + " | final: " + " | ".join(f"seed {s}" for s in args.seeds)
             + f" | final mean ± std | seeds within 0.05 of {baseline} |", "|---" * (len(args.seeds) + len(shown) + 4) + "|"]
    for name, per_seed in results.items():
        final = np.array([per_seed[s]["val_map"] for s in args.seeds])
        early = [np.array([val_map_after(per_seed[s], e) for s in args.seeds], dtype=float) for e in shown]
        within = sum(abs(per_seed[s]["val_map"] - results[baseline][s]["val_map"]) <= 0.05
                     or per_seed[s]["val_map"] >= results[baseline][s]["val_map"] for s in args.seeds)
        spread = lambda v: f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"  # noqa: E731
        seconds = np.mean([per_seed[s]["seconds_per_epoch"] for s in args.seeds])
        lines.append(f"| {name} | {seconds:.0f} | " + " | ".join(spread(v) for v in early) + " | "
                     + " | ".join(f"{v:.3f}" for v in final) + f" | {spread(final)} | {within}/{len(final)} |")
    table = "\n".join(lines)
    out = runs_dir() / args.name / "table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)
    print(f"figure: {draw_curves(results, out.with_name('val_map.png'))}")


def draw_curves(results: dict[str, dict[int, dict]], path: Path) -> Path:
    """Val mAP after each epoch, one line per setting (mean over seeds, the band their range)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, per_seed in results.items():
        epochs = sorted({r["epoch"] for m in per_seed.values() for r in m["history"] if "val/map" in r})
        curves = np.array([[val_map_after(m, e) for e in epochs] for m in per_seed.values()], dtype=float)
        line, = ax.plot(epochs, curves.mean(axis=0), marker="o", ms=3, label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(epochs, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="val mAP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
