"""TaNP's training objective (Lin et al., WWW 2021: "Task-adaptive Neural Process for User
Cold-Start Recommendation"); the model is the ``tanp`` backbone
(:mod:`metarec_plugins.backbones.tanp`).

TaNP is trained as a neural process, with no inner gradient loop (``inner_steps`` 0): each task
is adapted by encoding its support set (amortised adaptation), and the outer loss of a batch of
tasks ``i = 1..B`` is

    L = (1/B) sum_i [ NLL_i + beta * KL( q(z_i | tau_i) || q(z_i | S_i) ) ] + lambda * L_u

* ``NLL_i``: the regression loss of the task's target points, scored by the decoder with
  ``z_i ~ q(z_i | tau_i)`` (reparameterised) and the task embedding ``o_i`` of the support set:
  the mean squared error for explicit ratings (a Gaussian log-likelihood of fixed variance, the
  paper's and its code's loss), binary cross-entropy for implicit data. ``tau_i = S_i u Q_i`` is
  the whole task; the target points are ``tau_i`` (``likelihood: task``, the paper's ELBO, whose
  sum runs over every point of the task, context included, as in neural processes) or the query
  only (``likelihood: query``).
* ``KL``: the NP evidence lower bound's term between the posterior over the whole task and the
  prior over the support set (the "variational prior": the test-time encoder sees only
  ``S_i``), for diagonal Gaussians with log-variances ``v``:
  ``0.5 * sum_d [ exp(v_q - v_p) + (mu_q - mu_p)^2 / exp(v_p) - 1 + v_p - v_q ]``
  (:func:`gaussian_kl`); ``beta`` (``kl_weight``) is 1 in the paper.
* ``L_u``: the clustering regulariser of the customisation module (DEC's self-training target,
  Xie et al. 2016). With ``c_ik`` the soft assignments of the batch's tasks, the target is
  ``p_ik = (c_ik^2 / f_k) / sum_k' (c_ik'^2 / f_k')`` with cluster frequencies
  ``f_k = sum_i c_ik`` (:func:`cluster_target`), and ``L_u = (1/B) sum_i KL(p_i || c_i) =
  (1/B) sum_i sum_k p_ik log(p_ik / c_ik)`` (:func:`clustering_loss`), weighted by ``lambda``
  (``cluster_weight``). As in the paper's formula and its code, gradients flow through ``p``
  too; ``fixed_cluster_target`` detaches it (DEC's fixed target).

Everything is vmapped across the tasks of the batch (one batched computation, no Python loop);
only ``L_u`` couples the tasks, through ``f_k``.

At evaluation the framework starts each task at :meth:`TaNP.task_start` of the backbone: the
task state ``(z, o)`` from the support set (``z`` the prior's mean), i.e. the paper's test-time
prediction. ``inner_steps`` > 0 adds that many gradient steps on the task state (the support
loss, ``inner_lr``) at evaluation only: an extension, not in the paper; training is unchanged.

Departures from the authors' code, each stated where it applies: the context/target split is
the task's fixed support/query split (their code re-draws a random context and target from the
pooled support and query at every step: use ``data.train_support`` with ``resample_query`` for
that); the kernel uses the squared distance as the paper writes it (their code takes the
unsquared norm); ``lambda`` defaults to 1.0 (their run script and RecBole-MetaRec's ml-100k
configuration; their argument parser's default is 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.func import vmap

from metarec import (
    EpisodeBatch,
    FeatureBatch,
    FunctionalModel,
    MetaAlgorithm,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    masked_loss,
)

Likelihood = Literal["task", "query"]


def gaussian_kl(mean_q: torch.Tensor, logvar_q: torch.Tensor, mean_p: torch.Tensor,
                logvar_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p)))`` of diagonal Gaussians,
    summed over the last dimension."""
    return 0.5 * (torch.exp(logvar_q - logvar_p) + (mean_q - mean_p).pow(2) / torch.exp(logvar_p)
                  - 1.0 + logvar_p - logvar_q).sum(-1)


def cluster_target(assignment: torch.Tensor) -> torch.Tensor:
    """DEC's target distribution ``p_ik`` of soft assignments ``c`` ``(B, K)``: each ``c_ik``
    squared and divided by the cluster's frequency ``f_k = sum_i c_ik``, renormalised over
    ``k`` (sharper than ``c``, and discouraging one cluster from taking every task)."""
    weight = assignment.pow(2) / assignment.sum(0, keepdim=True)
    return weight / weight.sum(-1, keepdim=True)


def clustering_loss(assignment: torch.Tensor, fixed_target: bool = False) -> torch.Tensor:
    """``(1/B) sum_i KL(p_i || c_i)`` of the batch's soft assignments ``c`` ``(B, K)`` to
    their target ``p`` (:func:`cluster_target`; detached when ``fixed_target``)."""
    target = cluster_target(assignment)
    if fixed_target:
        target = target.detach()
    return (target * (target.log() - assignment.log())).sum(-1).mean()


def union(support: FeatureBatch, query: FeatureBatch) -> FeatureBatch:
    """One task's support and query rows together (``tau = S u Q``), support first."""
    return {k: torch.cat([support[k], query[k]], dim=0) for k in support if k in query}


class TaNP(MetaAlgorithm):
    """TaNP's neural-process objective with the clustering regulariser (see the module doc).

    Args:
        cluster_weight: ``lambda``, the weight of the clustering loss ``L_u`` (1.0: the
            authors' run script and RecBole-MetaRec's configuration).
        kl_weight: ``beta``, the weight of the KL term (1.0: the evidence lower bound).
        likelihood: the target points whose loss is scored: ``task`` (support and query: the
            paper's ELBO over ``tau_i``) or ``query``.
        fixed_cluster_target: detach DEC's target distribution (no gradient through ``p``).
        inner_steps: gradient steps on the task state at evaluation, after the amortised
            start (0, the paper: the start is the prediction).
        inner_lr: their step size.
        fast_parameters: patterns overriding the backbone's fast parameters (the task state).
    """

    def __init__(self, cluster_weight: NonNegativeFloat = 1.0, kl_weight: NonNegativeFloat = 1.0,
                 likelihood: Likelihood = "task", fixed_cluster_target: bool = False,
                 inner_steps: NonNegativeInt = 0, inner_lr: PositiveFloat = 0.01,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        if cluster_weight < 0 or kl_weight < 0:
            raise ValueError(f"cluster_weight and kl_weight must be >= 0, got {cluster_weight} "
                             f"and {kl_weight}")
        if likelihood not in ("task", "query"):
            raise ValueError(f"likelihood must be 'task' or 'query', got {likelihood!r}")
        self.cluster_weight = float(cluster_weight)
        self.kl_weight = float(kl_weight)
        self.likelihood = likelihood
        self.fixed_cluster_target = bool(fixed_cluster_target)

    def bind(self, model: FunctionalModel) -> None:
        super().bind(model)
        if not callable(getattr(model.backbone, "np_terms", None)):
            raise ValueError(f"the tanp algorithm trains the tanp backbone (its np_terms and "
                             f"task_start); got {type(model.backbone).__name__}")

    def task_losses(self, model: FunctionalModel, batch: EpisodeBatch
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-task ``(NLL (B,), KL (B,), soft assignments (B, K))`` of a batch, vmapped."""
        fast, slow = model.split()

        def one_task(support: FeatureBatch, query: FeatureBatch):
            task = union(support, query)
            terms = model.call("np_terms", fast, slow, support, task)
            state = {**fast, "task_z": terms["task_z"], "task_o": terms["task_o"]}
            target = task if self.likelihood == "task" else query
            nll = masked_loss(model.predict(state, slow, target), target["label"],
                              target["mask"], model.feedback)
            kl = gaussian_kl(terms["posterior_mean"], terms["posterior_logvar"],
                             terms["prior_mean"], terms["prior_logvar"])
            return nll, kl, terms["assignment"]

        return vmap(one_task, randomness="different")(batch.support, batch.query)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll, kl, assignment = self.task_losses(model, batch)
        cluster = clustering_loss(assignment, self.fixed_cluster_target)
        loss = (nll + self.kl_weight * kl).mean() + self.cluster_weight * cluster
        return loss, {"nll": nll.mean().detach(), "kl": kl.mean().detach(),
                      "cluster_loss": cluster.detach()}
