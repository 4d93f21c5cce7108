"""Benchmark: classifier training throughput and peak memory of each backbone setting.

One training step of the co-attention classifier as the demo trains it (pairs, no
self-pairs, the three loss terms, backward, SGD step) on random batches, in float32 on the
CPU (or bf16 autocast on CUDA). Each setting runs in its own process, so that its peak
memory is its own: the peak resident memory during the steps minus the memory before the
first step (on CUDA: torch's peak allocated memory). Printed: median step time, pairs per
second, its ratio to the first setting (the baseline, measured in the same run), and the
peak memory.

    python benchmarks/backbones.py                      # tiny 96 px vs efficientnet_lite0 at 96-256 px
    python benchmarks/backbones.py --steps 3 --settings tiny:96 efficientnet_lite0:160:frozen:os16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_SETTINGS = ["tiny:96"] + [f"efficientnet_lite0:{size}:{body}" for body in ("frozen", "trained")
                                  for size in (96, 128, 160, 256)]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(setting: str, steps: int, batch: int, num_classes: int = 10) -> dict:
    """Median step time and peak memory of one ``BACKBONE:SIZE[:frozen|trained][:osN]`` setting."""
    from wsss.losses import LossConfig, loss_terms
    from wsss.models import CoAttentionClassifier

    name, size, *options = setting.split(":")
    size, frozen = int(size), "frozen" in options
    stride = next((int(o[2:]) for o in options if o.startswith("os")), 8)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = CoAttentionClassifier(num_classes, backbone=name, pretrained=None, output_stride=stride, freeze_body=frozen,
                                  frozen_bn=name != "tiny").to(device).train()
    body_params, new_params = model.param_groups()
    opt = torch.optim.SGD([{"params": body_params, "lr": 1e-3}, {"params": new_params, "lr": 1e-2}],
                          momentum=0.9, weight_decay=5e-4)
    cfg = LossConfig(self_pairs=False)
    g = torch.Generator().manual_seed(0)
    times, before = [], _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):  # the first step warms up and is not timed
        x_m, x_n = torch.randn(2, batch, 3, size, size, generator=g).to(device)
        labels = (torch.rand(2, batch, num_classes, generator=g) < 0.3).float().to(device)
        labels[:, :, 0] = 1.0
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x_m, x_n, self_pairs=False)
        loss = loss_terms(out, labels[0], labels[1], cfg, epoch=cfg.con_warmup_epochs)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
    seconds = statistics.median(times)
    return {"setting": setting, "step_s": seconds, "pairs_per_s": batch / seconds, "peak_mib": peak,
            "device": str(device), "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                   help="BACKBONE:SIZE[:frozen|trained][:osN] (body trained unless 'frozen'; output stride 8 unless "
                        "osN); the first is the baseline")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one warm-up step)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (the demo's batch_size)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.batch)))
        return
    rows = []
    for setting in args.settings:
        out = subprocess.run([sys.executable, __file__, "--one", setting, "--steps", str(args.steps),
                              "--batch", str(args.batch)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["pairs_per_s"]
    print(f"{rows[0]['device']}, {rows[0]['threads']} threads, batch {args.batch} pairs, median of {args.steps} steps")
    print(f"{'setting':32s} {'step s':>8s} {'pairs/s':>8s} {'x base':>7s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['setting']:32s} {r['step_s']:8.3f} {r['pairs_per_s']:8.2f} {r['pairs_per_s'] / base:7.3f} "
              f"{r['peak_mib']:9.0f}")


if __name__ == "__main__":
    main()
