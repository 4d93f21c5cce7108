"""Localisation hypotheses, one row each: classifier setting x inference variant x seed.

For every classifier setting (a recipe and/or classifier overrides on configs/shapes.yaml)
and seed, the classifier is trained once (runs/localisation/SETTING_sSEED, an ordinary run
directory: finished work is kept, interrupted work resumes); every inference variant then
writes its own maps folder (maps_VARIANT, first --limit training images; the --config's maps
settings plus the variant's own, whatever the classifier's recipe), its pseudo-masks
(pseudo_VARIANT, the config's power rule + CRF; pseudo_VARIANT_nocrf without it) and is scored:
map mIoU at the best background threshold and over the whole threshold sweep, pseudo-mask mIoU
with and without the CRF, and the diagnostics of ``wsss.diagnostics`` over --pairs pairs.
Rows go to runs/localisation/rows.jsonl (a row already there is not recomputed) and the
mean ± std table over seeds to runs/localisation/table.md.

    python benchmarks/localisation_grid.py --seeds 0 1 2 \
        --setting basic:loss.coatt=false,loss.contrastive=false --variant cam:combine=cam \
        --setting ours: --variant cross:combine=coatt+self --variant cam:combine=cam
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from _settings import append_row, parse_setting, rows_done

from wsss import config as C
from wsss import diagnostics as D
from wsss.data.transforms import eval_transforms
from wsss.data.voc import VOCDataset
from wsss.evaluation import evaluate_maps, evaluate_masks
from wsss.paths import REPO_ROOT, runs_dir
from wsss.stages import make_maps, pipeline, pseudo_masks, train_classifier
from wsss.stages.train_classifier import load_classifier


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setting", action="append", default=[],
                        help="NAME:field=value,... classifier overrides; recipe=official selects a recipe")
    parser.add_argument("--variant", action="append", default=[], help="NAME:field=value,... maps overrides")
    parser.add_argument("--scene", default="", help="the benchmark's realism knobs, field=value,... "
                        "(body_class, context_p, context_size, noise_rate; wsss.data.synth)")
    parser.add_argument("--limit", type=int, default=500, help="training images that get maps")
    parser.add_argument("--pairs", type=int, default=60, help="pairs for the diagnostics")
    parser.add_argument("--root", default=str(runs_dir() / "localisation"))
    parser.add_argument("--figure", default=None, help="draw the maps of seed 0 side by side into this PNG, "
                        "columns from --column, images: the first --images training images; nothing is trained")
    parser.add_argument("--column", action="append", default=[], help="TITLE=SETTING/VARIANT")
    parser.add_argument("--images", type=int, default=6)
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.figure:
        draw(root, args)
        return
    if not args.setting or not args.variant:
        parser.error("give at least one --setting and one --variant (or --figure with --column)")
    root.mkdir(parents=True, exist_ok=True)
    rows_path = root / "rows.jsonl"
    done = rows_done(rows_path)
    base = yaml.safe_load(open(args.config))
    data_root = data_of(base, args.scene)
    variants = [parse_setting(v) for v in args.variant]
    parts = D.part_reader(data_root)  # the shapes benchmark's part maps; None on the art benchmark
    for setting, overrides in map(parse_setting, args.setting):
        recipe = overrides.pop("recipe", None)
        for seed in args.seeds:
            run_dir = root / f"{setting}_s{seed}"
            cfg = C.from_dict(pipeline.PipelineConfig, {
                **{k: base[k] for k in ("classifier", "maps", "pseudo")}, "recipe": recipe, "seed": seed,
                "run_dir": str(run_dir), "stages": ["classifier", "maps", "pseudo"]})
            cfg.classifier = C.merge(cfg.classifier, C.nest_dotted(overrides))
            stages = pipeline.stage_configs(cfg, data_root, run_dir)
            cfg.recipe = None  # the maps and pseudo-masks of each variant: the config's, plus its own overrides
            stages.update({k: v for k, v in pipeline.stage_configs(cfg, data_root, run_dir).items() if k != "classifier"})
            info = train_classifier.run(stages["classifier"])
            diag = None
            for variant, maps_over in variants:
                if (setting, variant, seed) in done:
                    continue
                maps_cfg = C.merge(C.to_dict(stages["maps"]),
                                           {**maps_over, "maps_dir": f"maps_{variant}", "limit": args.limit})
                make_maps.run(maps_cfg)
                maps_res = evaluate_maps(data_root, "train", run_dir / f"maps_{variant}",
                                                  allow_missing=True)
                pseudo_cfg = {**C.to_dict(stages["pseudo"]), "maps_dir": f"maps_{variant}",
                              "out_dir": f"pseudo_{variant}", "limit": args.limit}
                pseudo_masks.run(pseudo_cfg)
                pseudo_res = evaluate_masks(data_root, "train", run_dir / f"pseudo_{variant}",
                                                     allow_missing=True)
                pseudo_masks.run({**pseudo_cfg, "out_dir": f"pseudo_{variant}_nocrf", "use_crf": False})
                nocrf_res = evaluate_masks(data_root, "train", run_dir / f"pseudo_{variant}_nocrf",
                                                    allow_missing=True)
                names = VOCDataset(data_root, "train", with_mask=False).names[:args.limit]
                cover = {} if parts is None else {f"{k}@0.5": v[0] for k, v in D.maps_part_coverage(
                    data_root, run_dir / f"maps_{variant}", names).items() if k != "threshold"}
                if diag is None:
                    model = load_classifier(run_dir, "cpu")
                    masked = VOCDataset(data_root, "train", transforms=eval_transforms(), with_mask=True)
                    diag = D.collect(model, masked, D.shared_class_pairs(masked.labels, args.pairs, seed=0),
                                     parts=parts)
                row = {"setting": setting, "variant": variant, "seed": seed, "scene": args.scene,
                       "val_map": info["val_map"], "maps_miou": maps_res["miou"], "maps_threshold": maps_res["best_threshold"],
                       "maps_sweep": [p["miou"] for p in maps_res["sweep"]],
                       "pseudo_miou": pseudo_res["miou"], "pseudo_ignored": pseudo_res["num_ignored_images"],
                       "pseudo_nocrf_miou": nocrf_res["miou"], **cover, **diag}
                append_row(rows_path, row)
                print(json.dumps({k: row[k] for k in ("setting", "variant", "seed", "val_map", "maps_miou",
                                                       "maps_threshold", "pseudo_miou", "pseudo_nocrf_miou")}), flush=True)
    write_table(rows_path, root / "table.md")


def data_of(base: dict, scene: str) -> Path:
    """The benchmark of the base config with the scene knobs ``field=value,...`` set."""
    knobs = parse_setting(f"scene:{scene}")[1] if scene else {}
    return pipeline.prepare_data(C.from_dict(pipeline.PipelineConfig, {"benchmark": base["benchmark"],
                                                                       "scene": knobs}))


def draw(root: Path, args) -> None:
    from wsss import viz
    from wsss.data.voc import VOCDataset as Dataset

    data_root = data_of(yaml.safe_load(open(args.config)), args.scene)
    columns = {}
    for item in args.column:
        title, _, where = item.rpartition("=")
        setting, _, variant = where.partition("/")
        columns[title] = root / f"{setting}_s0" / f"maps_{variant}"
    ds = Dataset(data_root, "train", with_mask=False)
    fig = viz.maps_grid(data_root, columns, ds.names[:args.images], class_names=ds.class_names)
    viz.save_figure(fig, args.figure, "image, ground truth and the localization maps (maximum over the image's "
                    "classes) of each setting, seed 0: " + ", ".join(args.column),
                    "benchmarks/localisation_grid.py --figure (maps of the grid's seed-0 run directories, --root)")


COLUMNS = ("val_map", "maps_miou", "pseudo_miou", "pseudo_nocrf_miou", "part_recall@0.5", "body_recall@0.5", "object_share@0.5", "context_share@0.5", "att/obj->obj", "att/obj_area_n", "att/bg->bg",
           "cam/object", "cam/band", "coatt/object", "coatt/band", "coatt/context")


def write_table(rows_path: Path, out: Path) -> str:
    rows = [json.loads(line) for line in rows_path.open()]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["setting"], r["variant"]), []).append(r)
    lines = ["| setting | maps | seeds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    for (setting, variant), rs in groups.items():
        cells = []
        for col in COLUMNS:
            v = np.array([r.get(col, np.nan) for r in rs], dtype=float)
            scale = 1 if col == "val_map" else 100
            cells.append(f"{scale * v.mean():.{3 if scale == 1 else 1}f} ± {scale * v.std(ddof=1) if len(v) > 1 else 0:.{3 if scale == 1 else 1}f}")
        lines.append(f"| {setting} | {variant} | {len(rs)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out.write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
