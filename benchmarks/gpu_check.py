"""One command that says whether a GPU runs the VOC configs, and how fast: a single table.

Rows (each timed after a warm-up step, on random inputs and random weights: nothing is
downloaded):

- co-attention, explicit vs fused, forward + backward at 32², 64², 96² features (B = 2,
  C = 512), in bf16 on CUDA (fp32 on CPU): time and peak memory;
- one classifier training step at the VOC configs' shapes (configs/voc_vgg16.yaml and
  configs/voc_resnet101.yaml: 256 px, 5 pairs, self-pairs on, their recipe's losses):
  steps/s and peak memory;
- the maps stage's maps of one image (two classes, k = 3 partners each, self-pair views,
  256 px): images/s;
- one segmenter training step (DeepLabV3-ResNet101, crop 321, batch 10): steps/s and
  peak memory;
- the classifier's loss under bf16 autocast against float32 on the same batch and
  weights: relative difference, which must stay under ``--tolerance`` (exit code 1 if not).

    python benchmarks/gpu_check.py                       # on the GPU (sized for a few minutes; not yet timed on one)
    python benchmarks/gpu_check.py --device cpu --quick  # small shapes, a check that it runs (tests)

Peak memory is torch.cuda.max_memory_allocated() above what was allocated before the
step on CUDA, the process's resident-set high-water mark on CPU (as benchmarks/coattention.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from wsss import config as C
from wsss.paths import REPO_ROOT
from wsss.stages import pipeline, train_classifier

sys.path.insert(0, str(Path(__file__).parent))
from coattention import _reset_cpu_peak, _rss_bytes  # noqa: E402  (a sibling benchmark script)

CONFIGS = {"vgg16": REPO_ROOT / "configs" / "voc_vgg16.yaml", "resnet101": REPO_ROOT / "configs" / "voc_resnet101.yaml"}
NUM_CLASSES = 20


def measure(step, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds per call, peak bytes of the first measured call) of ``step()``,
    after one warm-up call."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes("VmRSS") if _reset_cpu_peak() else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - base if base is not None else float("nan")
    return statistics.median(times), peak


def classifier_config(backbone: str, size: int, batch: int):
    """The classifier section of a VOC config (its recipe included) at ``size`` px and
    ``batch`` pairs, with random weights."""
    raw = yaml.safe_load(CONFIGS[backbone].read_text())
    cfg = C.from_dict(pipeline.PipelineConfig, {**raw, "stages": ["classifier"]})
    stages = pipeline.stage_configs(cfg, Path("."), Path("."))
    return C.from_dict(train_classifier.ClassifierConfig,
                       {**C.to_dict(stages["classifier"]), "pretrained": None, "image_size": size, "batch_size": batch})


def pair_batch(size: int, batch: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(2, batch, NUM_CLASSES, generator=g) < 0.15).float()
    labels[:, :, 0] = 1.0  # partners share a class
    images = torch.randn(2, batch, 3, size, size, generator=g)
    return {"m": {"image": images[0].to(device), "label": labels[0].to(device)},
            "n": {"image": images[1].to(device), "label": labels[1].to(device)}}


def autocast(device: torch.device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def coattention_rows(device, sizes, channels, repeats, amp):
    from wsss.models.coattention import co_attention

    rows = []
    for size in sizes:
        g = torch.Generator().manual_seed(0)
        f_m, f_n = (torch.randn(2, channels, size, size, generator=g).to(device).requires_grad_(True)
                    for _ in range(2))
        weight = (torch.eye(channels) / channels ** 0.5).to(device).requires_grad_(True)
        for impl in ("explicit", "fused"):
            def step():
                with autocast(device, amp):
                    o_m, o_n = co_attention(f_m, f_n, weight, impl=impl)
                (o_m.float().sum() + o_n.float().sum()).backward()

            seconds, peak = measure(step, device, repeats)
            rows.append((f"co-attention {impl}, {size}² x {channels}, B = 2", f"{1000 * seconds:.1f} ms", peak))
    return rows


def classifier_rows(device, size, batch, repeats, amp):
    rows, models = [], {}
    for backbone in CONFIGS:
        cfg = classifier_config(backbone, size, batch)
        model = train_classifier.build_model(cfg, NUM_CLASSES).to(device)
        optimizer = train_classifier.build_optimizer(cfg, model)
        step_fn = train_classifier.make_step_fn(cfg.loss)
        data = pair_batch(size, batch, device)

        def step():
            with autocast(device, amp):
                terms = step_fn(model, data, 10)  # past every warm-up: all terms on
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()

        model.train()
        seconds, peak = measure(step, device, repeats)
        rows.append((f"classifier step, {backbone}, {size} px, {batch} pairs, self-pairs "
                     f"{'on' if cfg.loss.self_pairs else 'off'}", f"{1 / seconds:.2f} steps/s", peak))
        models[backbone] = (model.eval(), cfg, data)
    return rows, models


def maps_row(device, models, size, repeats, amp):
    from wsss.maps import localization_maps

    model, _, _ = models["vgg16"]
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, size, size, generator=g).to(device)
    partners = {c: [torch.randn(3, size, size, generator=g).to(device) for _ in range(3)] for c in (1, 2)}

    def step():
        with torch.no_grad(), autocast(device, amp):
            localization_maps(model, image, [1, 2], partners, combine=("cam", "coatt", "self"))

    seconds, peak = measure(step, device, repeats)
    return (f"maps of one image, vgg16, {size} px, 2 classes x k = 3 + self views", f"{1 / seconds:.2f} images/s",
            peak)


def segmenter_row(device, crop, batch, repeats, amp):
    from wsss.models.segmenter import build_segmenter, segmentation_loss

    model = build_segmenter("deeplabv3_resnet101", NUM_CLASSES + 1).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(batch, 3, crop, crop, generator=g).to(device)
    target = torch.randint(0, NUM_CLASSES + 1, (batch, crop, crop), generator=g).to(device)

    def step():
        with autocast(device, amp):
            loss = segmentation_loss(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds, peak = measure(step, device, repeats)
    return f"segmenter step, deeplabv3_resnet101, crop {crop}, batch {batch}", f"{1 / seconds:.2f} steps/s", peak


def bf16_agreement(device, models) -> float:
    """Relative difference of the classifier's total loss under bf16 autocast and in float32
    (same weights, same batch, eval mode)."""
    model, cfg, data = models["vgg16"]
    step_fn = train_classifier.make_step_fn(cfg.loss)
    with torch.no_grad():
        full = float(step_fn(model, data, 10)["total"])
        with autocast(device, True):
            half = float(step_fn(model, data, 10)["total"])
    return abs(half - full) / abs(full)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and one repeat: a check that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 5; --quick: 1)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest relative difference of the bf16 and float32 losses (default 0.02)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu (with --quick for a small run)")
    repeats = args.repeats or (1 if args.quick else 5)
    amp = device.type == "cuda"  # bf16 autocast where the stages use it
    if args.quick:
        sizes, channels, size, batch, crop, seg_batch = (8, 12), 32, 32, 2, 33, 2
    else:
        sizes, channels, size, batch, crop, seg_batch = (32, 64, 96), 512, 256, 5, 321, 10
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# gpu_check on {name}, torch {torch.__version__}, {'bf16' if amp else 'fp32'}"
          f"{', --quick' if args.quick else ''}\n")
    rows = coattention_rows(device, sizes, channels, repeats, amp)
    classifier, models = classifier_rows(device, size, batch, repeats, amp)
    rows += classifier
    rows.append(maps_row(device, models, size, repeats, amp))
    rows.append(segmenter_row(device, crop, seg_batch, repeats, amp))
    difference = bf16_agreement(device, models)
    print("| what | speed | peak memory |\n|---|---|---|")
    for what, speed, peak in rows:
        print(f"| {what} | {speed} | {peak / 2 ** 20:.0f} MiB |")
    ok = difference <= args.tolerance
    print(f"| classifier loss, bf16 autocast vs float32 (vgg16) | relative difference {difference:.2e} "
          f"({'ok' if ok else 'FAIL'}: tolerance {args.tolerance:g}) | - |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
