"""Tables and figures of docs/results.md sections 5 and 6 from the grid's rows.

Reads runs/localisation/rows.jsonl (benchmarks/results.sh writes it), writes one markdown
table per question (mean ± std over seeds, the seed count when it is not 3) into
docs/results.md between its ``<!-- results_report: NAME -->`` and ``<!-- /results_report -->``
lines (and prints them), draws
figures/results_maps_miou.png and figures/results_pseudo_miou.png (bars = mean, error bars
= std, dots = seeds) and copies the rows it used to docs/data/results_rows.jsonl, so the
per-seed values behind the tables are kept with them.

    python benchmarks/results_report.py [--rows runs/localisation/rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from wsss import viz
from wsss.paths import REPO_ROOT, runs_dir

# setting name prefix -> the condition it measures (METHOD.md sec. 5; data/README.md's knobs)
CONDITIONS = {
    "": "1: train",
    "s2_": "2: train + single-label",
    "s3_": "3: train + web (noise 0.3)",
    "s3n06_": "3: train + web (noise 0.6)",
    "bc1_": "bodies follow the class (body_class 1)",
    "ctx0_": "no context bands (context_p 0)",
}
SETTINGS_ROWS = list(CONDITIONS.values())[:4]
KNOB_ROWS = [CONDITIONS[""], *list(CONDITIONS.values())[4:]]
# (arm, variant) -> column
MAPS = {("basic", "cam"): "basic CAM", ("ours", "cam"): "ours: own CAM", ("ours", "coatt"): "ours: co-att (k = 3)",
        ("ours", "all"): "ours: CAM + co-att + self"}


def load(rows_path: Path) -> pd.DataFrame:
    rows = []
    for r in map(json.loads, rows_path.open()):
        prefix, _, arm = r["setting"].rpartition("_")
        condition = CONDITIONS.get(prefix + "_" if prefix else "")
        if condition and (arm, r["variant"]) in MAPS:
            rows.append({**r, "condition": condition, "arm": arm, "maps": MAPS[arm, r["variant"]]})
    return pd.DataFrame(rows)


def cell(values: pd.Series, scale: float = 100, digits: int = 1) -> str:
    v = scale * values.to_numpy(dtype=float)
    if not len(v):
        return "-"
    text = f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0:.{digits}f}"
    return text if len(v) == 3 else f"{text} (n = {len(v)})"


def table(df: pd.DataFrame, conditions: list[str]) -> str:
    head = ["condition", "val mAP basic", "val mAP ours", *[f"maps: {m}" for m in MAPS.values()],
            "pseudo: basic CAM", "pseudo: ours all"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for c in conditions:
        d = df[df["condition"] == c]
        if d.empty:
            continue
        by = lambda m: d[d["maps"] == m]  # noqa: E731
        cells = [cell(by("basic CAM")["val_map"], 1, 3), cell(by("ours: own CAM")["val_map"], 1, 3),
                 *[cell(by(m)["maps_miou"]) for m in MAPS.values()],
                 cell(by("basic CAM")["pseudo_miou"]), cell(by("ours: CAM + co-att + self")["pseudo_miou"])]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=str(runs_dir() / "localisation" / "rows.jsonl"))
    parser.add_argument("--figures", default=str(REPO_ROOT / "figures"))
    args = parser.parse_args(argv)
    df = load(Path(args.rows))
    tables = {"settings": table(df, SETTINGS_ROWS), "knobs": table(df, KNOB_ROWS)}
    doc = REPO_ROOT / "docs" / "results.md"
    text = doc.read_text()
    for name, markdown in tables.items():
        print(f"{name}:\n{markdown}\n")
        text = re.sub(rf"(<!-- results_report: {name} -->\n).*?(<!-- /results_report -->)",
                      lambda m: m.group(1) + markdown + "\n" + m.group(2), text, flags=re.S)
    doc.write_text(text)
    kept = REPO_ROOT / "docs" / "data" / "results_rows.jsonl"
    kept.parent.mkdir(exist_ok=True)
    kept.write_text("".join(json.dumps(r) + "\n" for r in df.drop(columns=["condition", "arm", "maps"])
                            .replace({np.nan: None}).to_dict("records")))
    order = [c for c in CONDITIONS.values() if c in set(df["condition"])]
    df["condition"] = pd.Categorical(df["condition"], order)
    df["maps"] = pd.Categorical(df["maps"], list(MAPS.values()))
    for metric in ("maps_miou", "pseudo_miou"):
        fig = viz.ablation_figure(df, metric, x="condition", hue="maps", xlabel="", size=(11, 4.5),
                                     title=f"{metric.replace('_', ' ')} per condition: basic CAM vs the method, "
                                           "mean ± std over seeds")
        fig.axes[0].tick_params(axis="x", labelrotation=15)
        viz.save_figure(fig, Path(args.figures) / f"results_{metric}.png",
                    f"{metric} of the first 500 training images per supervision setting and benchmark knob; "
                    "bars = mean, error bars = std over seeds, dots = seeds",
                    "benchmarks/results_report.py (from runs/localisation/rows.jsonl)")


if __name__ == "__main__":
    main()
