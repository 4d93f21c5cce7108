"""Tables and figures of docs/results.md from the grids' rows.

Adds the rows of runs/localisation/rows.jsonl and segmentation.jsonl (benchmarks/results.sh
writes them) to the per-seed rows kept in the repo, docs/data/results_rows.jsonl and
results_segmentation.jsonl (likewise runs/art's into docs/data/art_rows.jsonl and
art_segmentation.jsonl: section 7; a new row replaces a kept one of the same setting, variant,
seed and scene), writes one markdown table per question (mean ± std over seeds, the seed count
when it is not 3) into docs/results.md between its ``<!-- results_report: NAME -->`` and
``<!-- /results_report -->`` lines (and prints them), and draws section 1's figures
(figures/results_threshold_sweep.png: the maps over the background thresholds;
figures/results_ablation_{maps,pseudo}_miou.png) and those of sections 5-6
(figures/results_{maps,pseudo}_miou.png); bars = mean, error bars = std, dots = seeds.

    python benchmarks/results_report.py [--root runs/localisation]
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from pathlib import Path

import pandas as pd

from wsss import report, viz
from wsss.evaluation import DEFAULT_THRESHOLDS as THRESHOLDS
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
# (arm, variant) -> column of the settings and knobs tables
MAPS = {("basic", "cam"): "basic CAM", ("ours", "cam"): "ours: own CAM", ("ours", "coatt"): "ours: co-att (k = 3)",
        ("ours", "all"): "ours: CAM + co-att + self"}
# the training ablation (section 1): classifier setting of results.sh -> row label
ABLATION = {"basic": "basic only (plain CAM)", "coatt_nocon": "+ co-attention",
            "ours": "+ contrastive (`ours`)", "selfpairs": "+ self-pairs (`self_weighting: mean`)",
            "official": "the `official` recipe (configs/recipes/official.yaml)",
            "official_heads": "`official` with our head initialisation (`heads: ours`)"}
# the inference ablation (section 2): maps variant of the `ours` classifier -> row label
INFERENCE = {"cam": "single-image CAM", "coatt_k1": "co-attention, k = 1", "coatt": "co-attention, k = 3",
             "coatt_k5": "co-attention, k = 5", "self": "self-pairs only", "all_k1": "CAM + co-att + self, k = 1",
             "all": "CAM + co-att + self, k = 3", "all_k5": "CAM + co-att + self, k = 5",
             "cam_coatt": "CAM + co-att, k = 3 (no self-pairs)",
             "reference": "the reference's five-map aggregate"}
# the art benchmark (docs/results.md section 7, runs/art): classifier setting -> row label
ART = {"basic": "Lite0 ImageNet: basic only (plain CAM)", "ours": "Lite0 ImageNet: `ours`",
       "ours_top": "Lite0 ImageNet: `ours`, top-r pooling of s^{m∩n} (r = 0.25)",
       "tiny_basic": "tiny from scratch: basic only", "tiny_ours": "tiny from scratch: `ours`"}
# the attention diagnostics (wsss.diagnostics) -> column label
DIAGNOSTICS = {"att/obj->obj": "attention object -> object", "att/obj_area_n": "(partner's object share of cells)",
               "att/bg->obj": "background -> object", "cam/object": "CAM mass on the object",
               "coatt/object": "co-att mass on the object", "phi0/object": "phi_0 score on the object",
               "phi0/background": "phi_0 score on background"}
SEGMENTATION = {("basic", "cam"): "the basic classifier's CAM", ("ours", "all"): "`ours`, CAM + co-att + self",
                ("ours", "cam_coatt"): "`ours`, CAM + co-att (no self-pair maps)"}


def load(rows: list[dict]) -> pd.DataFrame:
    """Every row of the grid, with its condition, arm and settings-table column where it has them."""
    out = []
    for r in rows:
        prefix, _, arm = r["setting"].rpartition("_")
        out.append({**r, "condition": CONDITIONS.get(prefix + "_" if prefix else ""), "arm": arm,
                    "maps": MAPS.get((arm, r["variant"]))})
    return pd.DataFrame(out)


def cell(values: pd.Series, scale: float = 100, digits: int = 1) -> str:
    v = scale * values.dropna().to_numpy(dtype=float)
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (n = 1)"
    text = f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"
    return text if len(v) == 3 else f"{text} (n = {len(v)})"


def pick(df: pd.DataFrame, setting: str, variant: str, metric: str) -> pd.Series:
    d = df[(df["setting"] == setting) & (df["variant"] == variant)]
    return d[metric] if metric in d else pd.Series(dtype=float)


def markdown(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|---" * len(head) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def settings_table(df: pd.DataFrame, conditions: list[str]) -> str:
    rows = []
    for c in conditions:
        prefix = next(p for p, name in CONDITIONS.items() if name == c)
        if not (df["condition"] == c).any():
            continue
        at = lambda arm, variant, metric, *fmt: cell(pick(df, prefix + arm, variant, metric), *fmt)  # noqa: E731
        rows.append([c, at("basic", "cam", "val_map", 1, 3), at("ours", "cam", "val_map", 1, 3),
                     *[at(arm, variant, "maps_miou") for arm, variant in MAPS],
                     at("basic", "cam", "pseudo_miou"), at("ours", "all", "pseudo_miou")])
    return markdown(["condition", "val mAP basic", "val mAP ours", *[f"maps: {m}" for m in MAPS.values()],
                     "pseudo: basic CAM", "pseudo: ours all"], rows)


def ablation_table(df: pd.DataFrame, labels: dict = ABLATION) -> str:
    rows = []
    for setting, label in labels.items():
        if not (df["setting"] == setting).any():
            continue  # not run (yet)
        at = lambda variant, metric, *fmt: cell(pick(df, setting, variant, metric), *fmt)  # noqa: E731
        coatt = not setting.endswith("basic")  # a basic classifier's W_P is never trained: no co-att maps
        rows.append([label, at("cam", "val_map", 1, 3), at("cam", "maps_miou"),
                     at("coatt", "maps_miou") if coatt else "-", at("all", "maps_miou") if coatt else "-",
                     at("cam", "pseudo_miou"), at("cam", "pseudo_nocrf_miou"),
                     at("all", "pseudo_miou") if coatt else "-", at("all", "pseudo_nocrf_miou") if coatt else "-"])
    return markdown(["classifier", "val mAP", "its own CAM", "co-att maps (k = 3)", "CAM + co-att + self",
                     "pseudo from its CAM", "(no CRF)", "pseudo from all", "(no CRF)"], rows)


def inference_table(df: pd.DataFrame, setting: str = "ours") -> str:
    rows = [[label, cell(pick(df, setting, v, "maps_miou")), cell(pick(df, setting, v, "maps_threshold"), 1, 2),
             cell(pick(df, setting, v, "pseudo_miou")), cell(pick(df, setting, v, "pseudo_nocrf_miou"))]
            for v, label in INFERENCE.items() if (pick(df, setting, v, "maps_miou").notna()).any()]
    return markdown(["maps", "map mIoU", "best threshold", "pseudo-mask mIoU", "(no CRF)"], rows)


def diagnostics_table(df: pd.DataFrame, labels: dict) -> str:
    """The attention and map-mass diagnostics (%) and head scores of each classifier (they do
    not depend on the maps variant)."""
    head = ["classifier"]
    for key, text in DIAGNOSTICS.items():
        is_score = key.startswith("phi")  # a head's mean score, not a share
        head.append(text if is_score else f"{text} %")
    rows = []
    for setting, label in labels.items():
        if not (df["setting"] == setting).any():
            continue  # not run (yet)
        row = [label]
        for key in DIAGNOSTICS:
            values = pick(df, setting, "cam", key)
            row.append(cell(values, 1, 2) if key.startswith("phi") else cell(values))
        rows.append(row)
    return markdown(head, rows)


def pairs_table(df: pd.DataFrame) -> str:
    rows = [[label, *[cell(pick(df, setting, v, "maps_miou")) for v in ("cam", "coatt", "all")],
             cell(pick(df, setting, "all", "pseudo_miou"))]
            for setting, label in (("ours", "always share a class (`p_common: 1.0`, the reference)"),
                                   ("pcommon05", "half the time (`p_common: 0.5`)")) if (df["setting"] == setting).any()]
    return markdown(["partners", "its own CAM", "co-att maps", "all", "pseudo-masks from all"], rows)


def segmentation_table(seg: pd.DataFrame, rows_file: str = "results_segmentation.jsonl",
                       sections: str = "segmentation figures") -> str:
    if seg.empty:
        return f"(no rows in docs/data/{rows_file} yet: `benchmarks/results.sh {sections}`)"
    rows = []
    for (setting, variant), label in SEGMENTATION.items():
        d = seg[(seg["setting"] == setting) & (seg["variant"] == variant)]
        if d.empty:
            continue
        seeds = ", ".join(f"{100 * v:.1f}" for v in d.sort_values("seed")["seg_miou"])
        ignored = " / ".join(str(int(v)) for v in d.sort_values("seed").get("pseudo_ignored", pd.Series(dtype=int)))
        fg = " / ".join(cell(d[key]) if key in d else "-" for key in ("pseudo_fg_precision", "pseudo_fg_recall"))
        rows.append([label, cell(d["pseudo_miou"]), ignored or "-", fg, f"{cell(d['seg_miou'])} ({seeds})",
                     cell(d["seg_miou_crf"])])
    return markdown(["pseudo-masks from", "pseudo-mask mIoU (train)", "images ignored whole (per seed)",
                     "foreground precision / recall", "segmentation val mIoU (per seed)", "+ CRF"], rows)


def sweep_curves(df: pd.DataFrame, curves: dict) -> dict:
    """label -> the mean map mIoU over seeds at each background threshold, for viz.sweep_figure."""
    out = {}
    for label, (setting, variant) in curves.items():
        sweeps = pick(df, setting, variant, "maps_sweep").dropna()
        if len(sweeps):
            out[f"{label} (n = {len(sweeps)})"] = report.mean_sweep(
                [[{"threshold": t, "miou": m} for t, m in zip(THRESHOLDS, s)] for s in sweeps])
    return out


def merged(paths: list[Path], out: Path) -> list[dict]:
    """The rows of every file that exists (a later file's row replaces an earlier one of the same
    setting, variant, seed and scene), also written to ``out``: the per-seed values kept in the repo."""
    rows = {}
    for path in [out, *paths]:
        for r in map(json.loads, path.open()) if path.is_file() else ():
            rows[r["setting"], r["variant"], r["seed"], r.get("scene", "")] = r
    if rows:
        out.parent.mkdir(exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return list(rows.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(runs_dir() / "localisation"),
                        help="the grids' folder (its rows.jsonl and segmentation.jsonl)")
    parser.add_argument("--art-root", default=str(runs_dir() / "art"), help="the art benchmark's grid folder")
    parser.add_argument("--figures", default=str(REPO_ROOT / "figures"))
    args = parser.parse_args(argv)
    kept = REPO_ROOT / "docs" / "data"
    df = load(merged([Path(args.root) / "rows.jsonl"], kept / "results_rows.jsonl"))
    seg = pd.DataFrame(merged([Path(args.root) / "segmentation.jsonl"], kept / "results_segmentation.jsonl"))
    tables = {"ablation": ablation_table(df), "inference": inference_table(df), "pairs": pairs_table(df),
              "segmentation": segmentation_table(seg),
              "settings": settings_table(df, SETTINGS_ROWS), "knobs": settings_table(df, KNOB_ROWS)}
    art = load(merged([Path(args.art_root) / "rows.jsonl"], kept / "art_rows.jsonl"))
    art_seg = pd.DataFrame(merged([Path(args.art_root) / "segmentation.jsonl"], kept / "art_segmentation.jsonl"))
    if not art.empty:
        tables["art"] = ablation_table(art, ART)
        tables["art_inference"] = inference_table(art)
        tables["art_top_inference"] = inference_table(art, "ours_top")
        tables["art_tiny_inference"] = inference_table(art, "tiny_ours")
        tables["art_diagnostics"] = diagnostics_table(art, ART)
        tables["art_segmentation"] = segmentation_table(art_seg, "art_segmentation.jsonl", "art")
    doc = REPO_ROOT / "docs" / "results.md"
    text = doc.read_text()
    for name, table in tables.items():
        print(f"{name}:\n{table}\n")
        text = re.sub(rf"(<!-- results_report: {name} -->\n).*?(<!-- /results_report -->)",
                      lambda m: m.group(1) + table + "\n" + m.group(2), text, flags=re.S)
    doc.write_text(text)
    figures = Path(args.figures)
    source = "benchmarks/results_report.py (from docs/data/results_rows.jsonl)"
    curves = {"basic CAM": ("basic", "cam"), "ours: own CAM": ("ours", "cam"), "ours: co-att": ("ours", "coatt"),
              "ours: CAM + co-att + self": ("ours", "all"), "+ co-attention: CAM + co-att + self": ("coatt_nocon", "all")}
    fig = viz.sweep_figure(sweep_curves(df, curves), "map mIoU vs background threshold, mean over seeds (section 1)")
    viz.save_figure(fig, figures / "results_threshold_sweep.png", "map mIoU of the first 500 training images at "
                    "each background threshold, mean over seeds; star = best threshold", source)
    kinds = {"cam": "its own CAM", "coatt": "co-att (k = 3)", "all": "CAM + co-att + self"}
    abl = df[df["setting"].isin(list(ABLATION)) & df["variant"].isin(list(kinds))
             & ((df["setting"] != "basic") | (df["variant"] == "cam"))].copy()  # basic: its W_P never trained
    abl["classifier"] = pd.Categorical(abl["setting"].map(ABLATION),
                                       [label for s, label in ABLATION.items() if s in set(abl["setting"])])
    abl["maps kind"] = pd.Categorical(abl["variant"].map(kinds), list(kinds.values()))
    for metric in ("maps_miou", "pseudo_miou"):
        fig = viz.ablation_figure(abl, metric, x="classifier", hue="maps kind", xlabel="", size=(10, 4.5),
                                  title=f"training ablation (section 1): {metric.replace('_', ' ')}, mean ± std over seeds")
        ax = fig.axes[0]
        ax.set_xticks(ax.get_xticks(), [textwrap.fill(t.get_text(), 22) for t in ax.get_xticklabels()])
        viz.save_figure(fig, figures / f"results_ablation_{metric}.png",
                        f"{metric} of the first 500 training images per classifier and kind of maps; bars = mean, "
                        "error bars = std over seeds, dots = seeds", source)
    df = df[df["maps"].notna() & df["condition"].notna()].copy()
    order = [c for c in CONDITIONS.values() if c in set(df["condition"])]
    df["condition"] = pd.Categorical(df["condition"], order)
    df["maps"] = pd.Categorical(df["maps"], list(MAPS.values()))
    for metric in ("maps_miou", "pseudo_miou"):
        fig = viz.ablation_figure(df, metric, x="condition", hue="maps", xlabel="", size=(11, 4.5),
                                  title=f"{metric.replace('_', ' ')} per condition: basic CAM vs the method, "
                                        "mean ± std over seeds")
        fig.axes[0].tick_params(axis="x", labelrotation=15)
        viz.save_figure(fig, figures / f"results_{metric}.png",
                        f"{metric} of the first 500 training images per supervision setting and benchmark knob; "
                        "bars = mean, error bars = std over seeds, dots = seeds", source)


if __name__ == "__main__":
    main()
