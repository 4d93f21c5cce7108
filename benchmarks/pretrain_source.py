"""A backbone pre-trained by the repo itself, for the localisation hypothesis "the mechanism
needs semantically organised features" (docs/localisation.md).

The reference starts from ImageNet VGG16; nothing can be downloaded here. Instead a plain
CAM classifier (basic loss only) is trained on a *source* benchmark that the target never
sees: the same generator with another seed and 20 classes (twice the target's heads,
half of them of hues the target does not use), 1000 images of 96 px. Its backbone body is
saved as a TinyBackbone state dict, which ``classifier.pretrained`` loads:

    python benchmarks/pretrain_source.py                 # -> runs/localisation/source/backbone.pt
    python benchmarks/localisation_grid.py --setting pre_ours:pretrained=runs/localisation/source/backbone.pt ...

Like ImageNet for VOC, the source task shares the target's visual vocabulary (heads,
bodies, textures), not its images or its label set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from wsss import rundir as R
from wsss.data.synth import ensure_benchmark
from wsss.paths import REPO_ROOT, benchmark_root, runs_dir
from wsss.stages import train_classifier


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "shapes.yaml"),
                        help="its classifier section is the source training's (basic loss only)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--data-seed", type=int, default=1, help="generator seed of the source benchmark (not 0)")
    parser.add_argument("--out", default=str(runs_dir() / "localisation" / "source"))
    args = parser.parse_args(argv)
    if args.data_seed == 0:
        parser.error("--data-seed 0 is the target benchmark's seed: the source must be other images")
    root = ensure_benchmark(benchmark_root("demo", args.data_seed, {"classes": args.classes}), "demo",
                            seed=args.data_seed, num_classes=args.classes)
    base = yaml.safe_load(open(args.config))["classifier"]
    out = Path(args.out)
    info = train_classifier.run({**base, "data_root": str(root), "run_dir": str(out), "seed": 0,
                                 "loss": {"coatt": False, "contrastive": False}})
    state = torch.load(out / R.CLASSIFIER, map_location="cpu", weights_only=False)["model"]
    body = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.body.")}
    path = out / "backbone.pt"
    torch.save(body, path)
    print(f"source classifier val mAP {info['val_map']:.3f}; backbone body ({len(body)} tensors) -> {path}")
    return path


if __name__ == "__main__":
    main()
