"""Segmentation on the baseline's and on the method's pseudo-masks (the claims report, docs/results.md).

For each classifier setting of ``benchmarks/localisation_grid.py`` (its run directories under
runs/localisation, trained there first) and seed, the chosen maps variant is made for the
*whole* training split (maps_seg_VARIANT, the --config's maps settings plus the variant's own),
turned into pseudo-masks (pseudo_seg_VARIANT, the config's rule + CRF), and the config's
segmenter is trained on them in RUN/seg_VARIANT/ (an ordinary run directory: its segmenter.pt,
metrics.json). Val mIoU without and with CRF go to runs/localisation/segmentation.jsonl, with
the pseudo-masks' mIoU, coverage and foreground precision / recall (a row already there is
not recomputed; a finished stage's files are reused, so a removed row is rescored in minutes).

    python benchmarks/segmentation_grid.py --seeds 0 1 2 --run basic/cam:combine=cam --run ours/all:combine=all
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from _settings import append_row, parse_setting, rows_done

from wsss import config as C
from wsss.evaluation import evaluate_masks
from wsss.paths import REPO_ROOT, runs_dir
from wsss.stages import evaluate, make_maps, pipeline, pseudo_masks, train_segmenter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run", action="append", required=True,
                        help="SETTING/VARIANT:field=value,... maps overrides (the classifier run must exist)")
    parser.add_argument("--root", default=str(runs_dir() / "localisation"))
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()  # masks_dir below must be absolute: a relative one is read inside the run
    out = root / "segmentation.jsonl"
    done = rows_done(out)
    base = yaml.safe_load(open(args.config))
    data_root = pipeline.prepare_data(C.from_dict(pipeline.PipelineConfig, {"benchmark": base["benchmark"]}))
    for spec in args.run:
        where, maps_over = parse_setting(spec)
        setting, _, variant = where.partition("/")
        for seed in args.seeds:
            if (setting, variant, seed) in done:
                continue
            run_dir = root / f"{setting}_s{seed}"
            if not (run_dir / "classifier.pt").is_file():
                parser.error(f"{run_dir}/classifier.pt is missing: train it with benchmarks/localisation_grid.py first")
            cfg = C.from_dict(pipeline.PipelineConfig, {**{k: base[k] for k in ("maps", "pseudo", "segmenter", "evaluate")},
                                                        "seed": seed, "run_dir": str(run_dir),
                                                        "stages": ["maps", "pseudo", "segmenter", "evaluate"]})
            stages = pipeline.stage_configs(cfg, data_root, run_dir)
            maps_dir, pseudo_dir, seg_dir = f"maps_seg_{variant}", f"pseudo_seg_{variant}", run_dir / f"seg_{variant}"
            make_maps.run(C.merge(C.to_dict(stages["maps"]), {**maps_over, "maps_dir": maps_dir}))
            pseudo_masks.run({**C.to_dict(stages["pseudo"]), "maps_dir": maps_dir, "out_dir": pseudo_dir})
            seg = {**C.to_dict(stages["segmenter"]), "run_dir": str(seg_dir), "masks_dir": str(run_dir / pseudo_dir)}
            train_segmenter.run(seg)
            res = evaluate.run({**C.to_dict(stages["evaluate"]), "run_dir": str(seg_dir), "parts": ["segmenter"]})
            masks = evaluate_masks(data_root, "train", run_dir / pseudo_dir)
            row = {"setting": setting, "variant": variant, "seed": seed, "pseudo_miou": masks["miou"],
                   "pseudo_ignored": masks["num_ignored_images"], "pseudo_coverage": masks["coverage"],
                   **{f"pseudo_{key}": masks[key] for key in ("fg_precision", "fg_recall", "fg_share")},
                   "seg_miou": res["segmenter"]["miou"], "seg_miou_crf": res["segmenter"].get("miou_crf")}
            append_row(out, row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
