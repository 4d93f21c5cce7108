"""Why does a classifier stall? The first N optimizer steps of a config's classifier, per
seed and setting: loss terms, gradient norm (all parameters, and the backbone body's alone),
the share of backbone channels that are dead (zero at every position of every image of the
batch), the share of zero features, and the spread of the basic scores s_m over the batch
(0 when the network outputs a constant).

    python benchmarks/selfpair_diagnostics.py --seeds 0 1 2 --steps 60 \
        --setting none:loss.self_pairs=false --setting ours:loss.self_pairs=true \
        --setting official:loss.self_pairs=true,loss.w_basic=0.5,loss.w_coatt=0.5
    python benchmarks/selfpair_diagnostics.py --config configs/demo.yaml --seeds 0 --steps 30 --every 3 \
        --setting basic_lr0015:lr=0.015,loss.coatt=false,loss.contrastive=false --setting ours_lr0015:lr=0.015

Prints one line per setting and seed every --every steps; the last columns say whether the
run is still training (score spread > 0) or has collapsed.
"""

from __future__ import annotations

import argparse

import torch
import yaml
from _settings import parse_setting

from wsss import config as C
from wsss import loaders, lr_schedule
from wsss.data.synth import ensure_benchmark
from wsss.paths import REPO_ROOT, benchmark_root
from wsss.stages import train_classifier as T


def diagnose(cfg: T.ClassifierConfig, steps: int, every: int, name: str) -> list[dict]:
    base, pairs, _ = T._datasets(cfg)
    loaders.seed_everything(cfg.seed)
    model = T.build_model(cfg, base.num_classes)
    optimizer = T.build_optimizer(cfg, model)
    spe = loaders.steps_per_epoch(len(pairs), cfg.batch_size)
    scheduler = lr_schedule.build_scheduler(optimizer, schedule=cfg.schedule, total_steps=cfg.epochs * spe,
                                  steps_per_epoch=spe, step_epochs=cfg.step_epochs)
    step_fn = T.make_step_fn(cfg.loss)
    loader = loaders.make_train_loader(pairs, cfg.batch_size, seed=cfg.seed, epoch=0)
    feats = {}
    model.backbone.register_forward_hook(lambda mod, inp, out: feats.__setitem__("f", out.detach()))
    rows, step = [], 0
    model.train()
    while step < steps:
        for batch in loader:
            terms = step_fn(model, batch, 0)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            grad = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
            body_grad = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.backbone.backbone_parameters()
                                       if p.grad is not None))
            optimizer.step()
            scheduler.step()
            step += 1
            if step % every == 0 or step == 1:
                with torch.no_grad():
                    s = model.cam(batch["m"]["image"]).mean(dim=(2, 3))
                    f = feats["f"]
                dead = float((f.amax(dim=(0, 2, 3)) <= 0).float().mean())
                rows.append({"setting": name, "seed": cfg.seed, "step": step, "total": float(terms["total"].detach()),
                             "basic": float(terms["basic"].detach()), "grad_norm": float(grad),
                             "body_grad_norm": float(body_grad), "dead": dead, "zeros": float((f <= 0).float().mean()),
                             "score_std": float(s.std(dim=0).mean())})
                r = rows[-1]
                print(f"{name:>10} seed {cfg.seed} step {step:>4}: total {r['total']:7.3f} basic {r['basic']:6.3f} "
                      f"|grad| {r['grad_norm']:9.3f} body {r['body_grad_norm']:8.3f} dead channels {r['dead']:5.1%} "
                      f"zero features {r['zeros']:5.1%} score spread {r['score_std']:.4f}", flush=True)
            if step >= steps:
                break
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--setting", action="append", default=None,
                        help="NAME:key=value,... classifier overrides, dotted for the loss's "
                             "(default: none / ours, loss.self_pairs false / true)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pipe = yaml.safe_load(open(args.config))
    root = ensure_benchmark(benchmark_root(pipe.get("benchmark", "demo")), size=pipe.get("benchmark", "demo"), seed=0)
    settings = [parse_setting(s) for s in (args.setting or ["none:loss.self_pairs=false", "ours:loss.self_pairs=true"])]
    for name, overrides in settings:
        for seed in args.seeds:
            section = C.merge(pipe.get("classifier", {}), C.nest_dotted(overrides))
            cfg = C.from_dict(T.ClassifierConfig, {**section, "data_root": str(root), "run_dir": "/tmp/unused",
                                                   "seed": seed, "device": "cpu"})
            diagnose(cfg, args.steps, args.every, name)


if __name__ == "__main__":
    main()
