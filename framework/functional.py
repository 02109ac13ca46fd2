"""The functional view of a backbone that every gradient-based algorithm and policy shares.

A :class:`FunctionalModel` splits the backbone's parameters into *fast* (adapted per task)
and *slow* (shared) dicts and exposes pure functions of them: ``predict``, ``loss`` and the
inner loop ``adapt``. ``adapt_tasks`` vmaps the inner loop across the tasks of a batch, so a
batch of 32 tasks costs one batched computation, not 32 Python iterations.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metarec.data.episodes import FeatureBatch, inputs

Params = dict[str, torch.Tensor]
# (fast params, their gradients, step index) -> updated fast params
UpdateRule = Callable[[Params, Params, int], Params]


def select_parameters(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of ``module``'s parameters that match any ``fnmatch`` pattern, in module order."""
    names = [n for n, _ in module.named_parameters()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"fast-parameter pattern(s) {unmatched} match no parameter of "
                         f"{type(module).__name__}; its parameters are {names}")
    return chosen


def masked_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                feedback: str) -> torch.Tensor:
    """Mean loss over the unpadded entries: MSE for ratings, BCE-with-logits for implicit."""
    if feedback == "implicit":
        per = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
    else:
        per = (scores - labels) ** 2
    weight = mask.to(per.dtype)
    return (per * weight).sum() / weight.sum().clamp_min(1.0)


def sgd_update(lr: float) -> UpdateRule:
    """Plain gradient step ``theta - lr * grad``."""
    def update(fast: Params, grads: Params, step: int) -> Params:
        return {k: fast[k] - lr * grads[k] for k in fast}
    return update


class FunctionalModel:
    """A backbone seen as pure functions of (fast, slow) parameter dicts."""

    def __init__(self, backbone: nn.Module, fast_names: Sequence[str], feedback: str) -> None:
        if not fast_names:
            raise ValueError(f"{type(backbone).__name__} has no fast parameters to adapt")
        self.backbone = backbone
        self.fast_names = tuple(fast_names)
        self.feedback = feedback

    def split(self) -> tuple[Params, Params]:
        """The live (fast, slow) parameters: autograd reaches the backbone through them."""
        fast, slow = {}, {}
        for name, p in self.backbone.named_parameters():
            (fast if name in self.fast_names else slow)[name] = p
        return fast, slow

    def predict(self, fast: Params, slow: Params, batch: FeatureBatch) -> torch.Tensor:
        """Scores for a feature batch under the given parameters (any leading dims)."""
        buffers = dict(self.backbone.named_buffers())
        return functional_call(self.backbone, ({**slow, **fast}, buffers), (inputs(batch),))

    def loss(self, fast: Params, slow: Params, batch: FeatureBatch) -> torch.Tensor:
        """Masked loss of one task (or of all tasks at once, averaged over entries)."""
        scores = self.predict(fast, slow, batch)
        return masked_loss(scores, batch["label"], batch["mask"], self.feedback)

    def adapt(self, fast: Params, slow: Params, support: FeatureBatch, steps: int,
              update: UpdateRule, *, first_order: bool = False,
              trajectory: bool = False) -> Params | list[Params]:
        """Run ``steps`` inner updates on one task's support set.

        Gradients come from ``torch.func.grad``; the result stays differentiable with
        respect to ``fast`` (second order) unless ``first_order`` detaches the inner gradients.
        Returns the adapted parameters, or every iterate (step 0..steps) if ``trajectory``.
        """
        loss_fn = grad(lambda f: self.loss(f, slow, support))
        iterates = [fast]
        for step in range(steps):
            grads = loss_fn(fast)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast = update(fast, grads, step)
            if trajectory:
                iterates.append(fast)
        return iterates if trajectory else fast

    def adapt_tasks(self, fast: Params, slow: Params, support: FeatureBatch, steps: int,
                    update: UpdateRule, *, first_order: bool = False,
                    trajectory: bool = False) -> Params | list[Params]:
        """:meth:`adapt` vmapped across the tasks of a batch (leading dim of ``support``)."""
        def one(task_support: FeatureBatch):
            return self.adapt(fast, slow, task_support, steps, update,
                              first_order=first_order, trajectory=trajectory)
        return vmap(one, randomness="different")(support)

    def predict_tasks(self, fast: Params, slow: Params, batch: FeatureBatch) -> torch.Tensor:
        """Per-task scores ``(B, N)`` with per-task fast parameters (leading dim B)."""
        return vmap(lambda f, b: self.predict(f, slow, b), randomness="different")(fast, batch)

    def loss_tasks(self, fast: Params, slow: Params, batch: FeatureBatch) -> torch.Tensor:
        """Per-task losses ``(B,)`` with per-task fast parameters (leading dim B)."""
        return vmap(lambda f, b: self.loss(f, slow, b), randomness="different")(fast, batch)
