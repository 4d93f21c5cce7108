"""Losses of the co-attention classifier (METHOD.md sec. 1).

CE is the multi-label soft-margin loss: per sample the mean over the K classes of the
sigmoid binary cross-entropy, then the mean over the batch.

    basic       = CE(s_m, l_m) + CE(s_n, l_n)
    coatt       = CE(s_co_m, l_m ∩ l_n) + CE(s_co_n, l_m ∩ l_n)
    contrastive = CE(s_con_m, l_m \\ l_n) + CE(s_con_n, l_n \\ l_m)

Empty contrastive targets (l_m \\ l_n = {}), by ``LossConfig.empty_contrastive``:

- ``"negative"`` (the reference, Classifier/scripts/train.py:257-258 and 278-282): every
  sample counts, an empty target is all-negative ("nothing else is here"); a side's term
  is skipped (0) only when no sample of the batch has a non-empty target on that side;
- ``"skip"``: the mean runs over the samples with a non-empty target only (0 if none).

A skipped term is 0 still attached to the graph, so every parameter receives a (zero)
gradient, e.g. under DDP. The contrastive term is on from epoch ``con_warmup_epochs``
(0-based) onwards (train.py:278). The co-attention target l_m ∩ l_n is used even when
empty ("nothing in common" is a signal).

Weights: the reference's terms are each one soft-margin loss over the 2B concatenated
samples of a pair (train.py:254-265), i.e. half of our CE(s_m) + CE(s_n), while each of
its contrastive sides is a mean over B; ``w_basic = w_coatt = 0.5`` (``w_con = w_self = 1``)
reproduces its total exactly (the ``official`` recipe).

Self-pairs (I_m, T(I_m)) are pairs whose partner label is l_m: their basic and
co-attention terms use target l_m on both sides (their contrastive targets are empty).

``loss_terms`` returns the unweighted terms (always every key, 0 when switched off or
warming up, for fixed logging columns) and ``total``. With ``self_weighting="sum"`` (the
reference's, Classifier/scripts/train.py:269):

    total = w_basic*basic + w_coatt*coatt + w_con*contrastive
            + w_self*(w_basic*self_basic + w_coatt*self_coatt)

With ``self_weighting="mean"`` (ours, the default) and self-pairs on, the cross pair and
the mean over the V self-pairs weigh half each, so that the loss keeps the scale it has
without self-pairs (and the learning rate chosen for it stays right):

    total = 1/2 (w_basic*basic + w_coatt*coatt) + w_con*contrastive
            + 1/2 * w_self/V * (w_basic*self_basic + w_coatt*self_coatt)

(without it, the self-pair terms add about three times the pair loss, and a from-scratch
demo classifier at the demo lr stayed at chance in 2 of 3 seeds; README, "Self-pair
training"). Without self-pairs both rules give the first line.

where each term enters only if its switch is on (and self_* only if ``self_pairs``);
a term switched off adds 0 * term, so the value is unchanged but every parameter used in
the forward pass gets a gradient (zero), which DistributedDataParallel expects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from wsss import config as C


@dataclass
class LossConfig:
    """Ablation switches and weights of the loss terms (METHOD.md sec. 1)."""

    basic: bool = C.setting(True, "basic (plain CAM) loss")
    coatt: bool = C.setting(True, "co-attention loss")
    contrastive: bool = C.setting(True, "contrastive co-attention loss")
    self_pairs: bool = C.setting(True, "self-pairs (flip, 0.75x, 2x)")
    w_basic: float = C.setting(1.0, "weight of the basic loss", allowed=">= 0")
    w_coatt: float = C.setting(1.0, "weight of the co-attention loss", allowed=">= 0")
    w_con: float = C.setting(1.0, "weight of the contrastive loss", allowed=">= 0")
    w_self: float = C.setting(1.0, "weight of the self-pair losses", allowed=">= 0")
    con_warmup_epochs: int = C.setting(2, "epochs before the contrastive loss is switched on", allowed=">= 0")
    empty_contrastive: Literal["negative", "skip"] = C.setting(
        "skip", "an empty contrastive target: skip (left out of the mean) or negative (all-negative target, the "
                "reference)")
    self_weighting: Literal["mean", "sum"] = C.setting(
        "mean", "mean: the pair and the mean self-pair weigh half each (ours); sum: self-pair terms added (the "
                "reference)")

    def __post_init__(self) -> None:  # the ranges and choices are the fields' own (checked by config.from_dict)
        if not (self.basic or self.coatt or self.contrastive):
            raise ValueError("LossConfig: at least one of basic, coatt, contrastive must be on")


def multilabel_soft_margin(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample multi-label soft-margin loss (B,): mean over classes of BCE with logits.
    Computed in float32 at least (scores from a bf16 autocast region are upcast)."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return F.multilabel_soft_margin_loss(scores.to(dtype), targets.to(dtype), reduction="none")


def ce(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE of METHOD.md: the soft-margin loss averaged over the batch."""
    return multilabel_soft_margin(scores, targets).mean()


def ce_nonempty(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE over the samples whose target set is non-empty; 0 (graph-attached) if none."""
    per_sample = multilabel_soft_margin(scores, targets)
    keep = (targets > 0).any(dim=1).to(per_sample.dtype)
    return (per_sample * keep).sum() / keep.sum().clamp(min=1)


def ce_any_nonempty(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE over every sample (empty targets all-negative) when at least one sample of the
    batch has a non-empty target; 0 (graph-attached) otherwise (the reference's rule)."""
    loss = ce(scores, targets)
    return loss if bool((targets > 0).any()) else loss * 0.0


def basic(out: dict, l_m: torch.Tensor, l_n: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """CE(s_m, l_m) + CE(s_n, l_n): the plain CAM classifier's loss."""
    return ce(out["s_m"], l_m) + ce(out["s_n"], l_n)


def coatt(out: dict, l_m: torch.Tensor, l_n: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """CE(s_co_m, l_m ∩ l_n) + CE(s_co_n, l_m ∩ l_n): the co-attention loss."""
    common = l_m * l_n
    return ce(out["s_co_m"], common) + ce(out["s_co_n"], common)


def contrastive(out: dict, l_m: torch.Tensor, l_n: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """CE(s_con_m, l_m minus l_n) + CE(s_con_n, l_n minus l_m), empty targets by ``cfg.empty_contrastive``."""
    con = {"negative": ce_any_nonempty, "skip": ce_nonempty}[cfg.empty_contrastive]
    return con(out["s_con_m"], l_m * (1 - l_n)) + con(out["s_con_n"], l_n * (1 - l_m))


@dataclass(frozen=True)
class Term:
    """One loss term: its function of a pair's outputs and labels, the LossConfig fields
    that switch it on and weigh it, whether self-pairs also have it (as ``self_NAME``,
    target l_m on both sides), and the LossConfig field of its first epoch (warm-up)."""

    fn: Callable[[dict, torch.Tensor, torch.Tensor, LossConfig], torch.Tensor]
    switch: str
    weight: str
    on_self_pairs: bool
    from_epoch: str | None = None


#: the loss terms of METHOD.md sec. 1; a new term is a function above and a row here (with
#: its switch and weight settings in LossConfig)
LOSS_TERMS = {
    "basic": Term(basic, "basic", "w_basic", on_self_pairs=True),
    "coatt": Term(coatt, "coatt", "w_coatt", on_self_pairs=True),
    "contrastive": Term(contrastive, "contrastive", "w_con", on_self_pairs=False, from_epoch="con_warmup_epochs"),
}
SELF_TERMS = tuple(f"self_{name}" for name, term in LOSS_TERMS.items() if term.on_self_pairs)
TERMS = (*LOSS_TERMS, *SELF_TERMS)
#: the LossConfig switches of the terms, and of the self-pairs
SWITCHES = (*(term.switch for term in LOSS_TERMS.values()), "self_pairs")


def pair_terms(out: dict, l_m: torch.Tensor, l_n: torch.Tensor, cfg: LossConfig,
               names=tuple(LOSS_TERMS)) -> dict[str, torch.Tensor]:
    """The unweighted terms ``names`` of one pair (METHOD.md sec. 1)."""
    l_m, l_n = (l_m > 0).float(), (l_n > 0).float()
    return {name: LOSS_TERMS[name].fn(out, l_m, l_n, cfg) for name in names}


def self_pair_terms(out: dict, l_m: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """The self-pair terms (self_basic, self_coatt), each summed over the self-pairs in
    out["self"] (target l_m on both sides)."""
    if not out["self"]:
        raise ValueError("out['self'] holds no self-pairs")
    names = [name for name, term in LOSS_TERMS.items() if term.on_self_pairs]
    per_view = [pair_terms(o, l_m, l_m, cfg, names) for o in out["self"].values()]
    return {f"self_{name}": sum(terms[name] for terms in per_view) for name in names}


def loss_terms(out: dict, l_m: torch.Tensor, l_n: torch.Tensor, cfg: LossConfig,
               epoch: int) -> dict[str, torch.Tensor]:
    """Every term in TERMS (unweighted; 0 when off) and the weighted ``total``.

    ``out`` is CoAttentionClassifier.forward's dict; l_m, l_n (B, K) multi-hot labels.
    Raises if cfg.self_pairs is on but ``out`` has no "self" entry. Tensors below float32
    (from a bf16 autocast forward pass) are upcast: the losses are computed in float32 at least.
    """
    if cfg.self_pairs and "self" not in out:
        raise ValueError("LossConfig.self_pairs is on but the model output has no self-pairs; "
                         "call the model with self_pairs=True or set self_pairs=False")
    terms = pair_terms(out, l_m, l_n, cfg)
    if cfg.self_pairs:
        terms.update(self_pair_terms(out, l_m, cfg))

    # self_weighting "mean": a term's cross pair and its mean self-pair weigh 1/2 each, so
    # turning self-pairs on keeps the loss scale the lr was chosen for
    mean = cfg.self_pairs and cfg.self_weighting == "mean"
    switches, weights = {}, {}
    for name, term in LOSS_TERMS.items():
        warm = term.from_epoch is None or epoch >= getattr(cfg, term.from_epoch)
        switches[name] = getattr(cfg, term.switch) and warm
        weights[name] = getattr(cfg, term.weight) * (0.5 if mean and term.on_self_pairs else 1.0)
        if term.on_self_pairs:
            switches[f"self_{name}"] = cfg.self_pairs and switches[name]
            per_view = 0.5 / len(out["self"]) if mean else 1.0
            weights[f"self_{name}"] = per_view * cfg.w_self * getattr(cfg, term.weight)

    # A term computed but switched off enters as 0 * term: the same value, and every parameter
    # of the forward pass still gets a (zero) gradient, so DDP needs no find_unused_parameters.
    zero = terms["basic"].new_zeros(())
    total = zero
    for name, value in terms.items():
        total = total + (weights[name] if switches[name] else 0.0) * value
    out_terms = {name: terms[name] if switches[name] else zero for name in TERMS}
    return {**out_terms, "total": total}
