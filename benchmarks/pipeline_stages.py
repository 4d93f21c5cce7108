"""Benchmark: throughput of the maps and pseudo-mask stages with 1 and 2 workers, and the
share of the demo pipeline's time each stage takes.

1. Runs the shapes pipeline (configs/shapes.yaml, the demo before the art benchmark) into a fresh run directory, timing each stage
   (or, with ``--run-dir``, reuses a finished demo run and reads nothing but its classifier
   and maps; the stage shares are then not measured).
2. Recomputes the localization maps of the first ``--images`` training images into a
   scratch folder with 1 and 2 CPU threads (and 2 DataLoader workers), and the pseudo-masks
   of the same images with 1 and 2 worker processes; prints images per second and the
   speed-up of 2 workers over 1, measured in the same run.

    python benchmarks/pipeline_stages.py                    # ~10 min on 2 CPU cores
    python benchmarks/pipeline_stages.py --run-dir runs/demo --images 200
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from wsss import config as C
from wsss.paths import REPO_ROOT
from wsss.stages import make_maps, pipeline, pseudo_masks


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "shapes.yaml"), help="pipeline YAML")
    parser.add_argument("--run-dir", default=None, help="a finished run to reuse (skips step 1)")
    parser.add_argument("--images", type=int, default=200, help="images for the throughput runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    scratch = Path(tempfile.mkdtemp(prefix="wsss-bench-"))
    try:
        cfg = C.load_yaml(pipeline.PipelineConfig, args.config)
        if args.run_dir:
            run_dir = pipeline.resolve_run_dir(args.run_dir)
            data_root = pipeline.prepare_data(cfg)
        else:
            cfg.run_dir = str(scratch / "run")
            result, total = timed(pipeline.run, cfg)
            run_dir, data_root = Path(result["run_dir"]), result["data_root"]
            print(f"\n{args.config}: whole pipeline {total:.0f} s on {torch.get_num_threads()} threads")
            print(f"{'stage':12s} {'seconds':>8s} {'share':>6s}")
            for name, sec in result["seconds"].items():
                print(f"{name:12s} {sec:8.1f} {100 * sec / total:5.1f}%")

        stages = pipeline.stage_configs(cfg, Path(data_root), run_dir)
        maps_base = C.to_dict(stages["maps"])
        threads = torch.get_num_threads()
        rows = []
        for label, n_threads, loader_workers in [("1 thread", 1, 0), ("2 threads", 2, 0),
                                                 ("2 threads + 2 loaders", 2, 2)]:
            torch.set_num_threads(n_threads)
            out = make_maps.run({**maps_base, "maps_dir": str(scratch / "maps"), "limit": args.images,
                                 "overwrite": True, "workers": loader_workers})
            rows.append(("maps", label, out["images_per_s"]))
        torch.set_num_threads(threads)
        pseudo_base = C.to_dict(stages["pseudo"])
        for workers in (1, 2):
            out = pseudo_masks.run({**pseudo_base, "maps_dir": str(scratch / "maps"), "out_dir": str(scratch / "pseudo"),
                                    "limit": args.images, "overwrite": True, "workers": workers})
            rows.append(("pseudo-masks", f"{workers} worker(s)", out["images_per_s"]))

        print(f"\nthroughput on the first {args.images} training images ({data_root})")
        print(f"{'stage':13s} {'setting':24s} {'images/s':>9s} {'vs first':>9s}")
        first = {}
        for stage, label, ips in rows:
            first.setdefault(stage, ips)
            print(f"{stage:13s} {label:24s} {ips:9.1f} {ips / first[stage]:8.2f}x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
