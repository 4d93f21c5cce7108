"""Benchmark: one training step with self-pairs, shared backbone pass vs per-pair passes.

A step is the pair (I_m, I_n) plus the three self-pairs (flip, 0.75x, 2x of I_m):
forward, loss_terms, backward, SGD step. ``shared=True`` computes I_m's backbone pass once
and reuses it for all four pairs (METHOD.md sec. 1, self-pairs); ``shared=False`` is the
reference per-pair formulation. Both models start from the same weights and see the same
batches; steps alternate between the two so that machine load affects both alike.
Printed: median step time, pairs per second, the speed-up, and the losses of each step
(equal up to float rounding, since the two formulations compute the same function).

    python benchmarks/selfpair_step.py                                 # tiny, 96 px, 8 pairs
    python benchmarks/selfpair_step.py --backbone vgg16 --size 64 --batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from wsss.losses import LossConfig, loss_terms
from wsss.models import CoAttentionClassifier


def make_batches(steps: int, batch: int, size: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x_m, x_n = torch.randn(2, batch, 3, size, size, generator=g)
        l_m = (torch.rand(batch, num_classes, generator=g) < 0.3).float()
        l_n = (torch.rand(batch, num_classes, generator=g) < 0.3).float()
        l_m[:, 0] = l_n[:, 0] = 1.0   # partners share a class, as with p_common = 1
        yield x_m, x_n, l_m, l_n


def train_step(model, opt, batch, shared: bool, cfg: LossConfig, device) -> tuple[float, float]:
    x_m, x_n, l_m, l_n = (t.to(device) for t in batch)
    t0 = time.perf_counter()
    out = model(x_m, x_n, self_pairs=True, shared=shared)
    loss = loss_terms(out, l_m, l_n, cfg, epoch=cfg.con_warmup_epochs)["total"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, float(loss.detach())


def make_optimizer(model, lr: float):
    body, new = model.param_groups()
    return torch.optim.SGD([{"params": body, "lr": lr}, {"params": new, "lr": 10 * lr}],
                           momentum=0.9, nesterov=True, weight_decay=5e-4)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode (after 1 warm-up)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--coatt-impl", default="fused", choices=["fused", "explicit"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = CoAttentionClassifier(args.num_classes, backbone=args.backbone,
                                 coatt_impl=args.coatt_impl).to(device).train()
    models = {mode: copy.deepcopy(base) for mode in ("shared", "per-pair")}
    opts = {mode: make_optimizer(m, args.lr) for mode, m in models.items()}
    cfg = LossConfig(con_warmup_epochs=0)
    times = {mode: [] for mode in models}
    losses = {mode: [] for mode in models}
    batches = make_batches(args.steps + 1, args.batch, args.size, args.num_classes)
    for i, batch in enumerate(batches):
        order = ("shared", "per-pair") if i % 2 == 0 else ("per-pair", "shared")
        for mode in order:
            dt, loss = train_step(models[mode], opts[mode], batch, mode == "shared", cfg, device)
            losses[mode].append(loss)
            if i > 0:   # step 0 is the warm-up
                times[mode].append(dt)

    print(f"training step with 3 self-pairs: backbone={args.backbone}, {args.size} px, "
          f"{args.batch} pairs/step, co-attention={args.coatt_impl}, device={args.device}, "
          f"median of {args.steps} steps")
    print(f"{'mode':>9} {'step s':>8} {'pairs/s':>8}   losses per step (incl. warm-up)")
    for mode in models:
        t = statistics.median(times[mode])
        print(f"{mode:>9} {t:>8.3f} {args.batch / t:>8.2f}   "
              + " ".join(f"{v:.6f}" for v in losses[mode]))
    speedup = statistics.median(times["per-pair"]) / statistics.median(times["shared"])
    diff = max(abs(a - b) for a, b in zip(losses["shared"], losses["per-pair"]))
    print(f"speed-up shared / per-pair: {speedup:.2f}x   max |loss difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
