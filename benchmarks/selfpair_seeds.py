"""Does self-pair training train? The demo classifier (configs/demo.yaml's classifier
section) trained for its full length per seed and loss setting; prints and writes a
markdown table of the final val mAP (and the gap to the first setting, the baseline).

    python benchmarks/selfpair_seeds.py --seeds 0 1 2 3 4 \
        --setting none:self_pairs=false --setting ours:self_pairs=true

Each run is an ordinary run directory under runs/selfpair/NAME_sSEED: a finished run is
kept (re-running the script only trains what is missing), an interrupted one resumes.
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--setting", action="append", required=True, help="NAME:field=value,...")
    parser.add_argument("--out", default=str(runs_dir() / "selfpair" / "table.md"))
    args = parser.parse_args(argv)
    pipe = yaml.safe_load(open(args.config))
    size = pipe.get("benchmark", "demo")
    root = ensure_benchmark(benchmark_root(size), size=size, seed=0)
    results: dict[str, dict[int, float]] = {}
    for name, overrides in map(parse_setting, args.setting):
        for seed in args.seeds:
            section = {**pipe.get("classifier", {}), **overrides}
            cfg = C.from_dict(T.ClassifierConfig, {**section, "data_root": str(root), "seed": seed,
                                                   "run_dir": str(runs_dir() / "selfpair" / f"{name}_s{seed}")})
            metrics = T.run(cfg)
            results.setdefault(name, {})[seed] = metrics["val_map"]
            print(json.dumps({"setting": name, "seed": seed, "val_map": metrics["val_map"]}), flush=True)
    base = results[next(iter(results))]
    lines = ["| setting | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std | seeds within 0.05 of "
             f"{next(iter(results))} |", "|---" * (len(args.seeds) + 3) + "|"]
    for name, per_seed in results.items():
        vals = np.array([per_seed[s] for s in args.seeds])
        within = sum(abs(per_seed[s] - base[s]) <= 0.05 or per_seed[s] >= base[s] for s in args.seeds)
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {vals.mean():.3f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.3f} | {within}/{len(vals)} |")
    table = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
