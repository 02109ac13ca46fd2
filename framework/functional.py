"""The functional view of a backbone that every gradient-based algorithm and policy shares.

A :class:`FunctionalModel` splits the backbone's parameters into *fast* (adapted per task)
and *slow* (shared) dicts and exposes pure functions of them: ``predict``, ``loss`` and the
inner loop ``adapt``. ``adapt_tasks`` vmaps the inner loop across the tasks of a batch, so a
batch of 32 tasks costs one batched computation, not 32 Python iterations.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_map

from metarec.data.episodes import ENCODED, FeatureBatch, inputs

Params = dict[str, torch.Tensor]
# An inner objective of one task: (fast params, support batch) -> scalar loss.
Objective = Callable[[Params, FeatureBatch], torch.Tensor]


class InnerOptimizer:
    """A functional inner-loop optimiser.

    Its state is explicit (returned by :meth:`init`, threaded through :meth:`step`) rather than
    stored on the object, so one optimiser object serves every task under ``vmap`` and the
    whole loop stays differentiable for second-order meta-gradients.
    """

    def init(self, fast: Params) -> Any:
        """Initial state for one task starting at ``fast``."""
        return None

    def step(self, fast: Params, grads: Params, state: Any, step: int) -> tuple[Params, Any]:
        """One update: returns the new fast parameters and the new state."""
        raise NotImplementedError


def clip_grad_norm(grads: Params, max_norm: float, eps: float = 1e-12) -> Params:
    """``grads`` rescaled so that their global L2 norm (over every tensor of the dict) is at
    most ``max_norm``; unchanged when it already is.

    A pure function of one task's gradients: under ``vmap`` the norm is each task's own. It is
    differentiable (second-order meta-gradients flow through the rescaling); the squared norm
    is floored at ``eps**2`` so that an all-zero gradient has a finite derivative.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    squares = [g.pow(2).sum() for g in grads.values()]
    if not squares:
        return grads
    norm = torch.stack(squares).sum().clamp_min(eps * eps).sqrt()
    scale = (max_norm / norm).clamp(max=1.0)
    return {k: g * scale for k, g in grads.items()}


class SGD(InnerOptimizer):
    """``theta - lr * grad``, optionally on gradients clipped by their global norm.

    ``lr`` is a float; a 1-D tensor of per-step rates (step ``i`` uses ``lr[min(i, len-1)]``,
    MAML++'s learned per-step rates); a dict of rate tensors that broadcast against the fast
    parameters (per-element rates shaped like them: Meta-SGD; or scalar per-tensor rates); or a
    list/tuple of per-step rates, each any of the above (step ``i`` uses
    ``lr[min(i, len-1)]``: MAML++'s per-layer per-step rates as a list of dicts of scalars).

    ``max_grad_norm`` (None: off) rescales each step's gradients so that their global L2 norm
    over all fast parameters of the task is at most ``max_grad_norm``
    (:func:`clip_grad_norm`), which bounds the step's update by ``max|lr| * max_grad_norm``.
    """

    def __init__(self, lr: float | torch.Tensor | Mapping[str, torch.Tensor] | Sequence[Any],
                 max_grad_norm: float | None = None) -> None:
        if isinstance(lr, (list, tuple)) and not lr:
            raise ValueError("SGD needs at least one per-step rate, got an empty sequence")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.lr = lr
        self.max_grad_norm = max_grad_norm

    def step(self, fast: Params, grads: Params, state: Any, step: int) -> tuple[Params, Any]:
        if self.max_grad_norm is not None:
            grads = clip_grad_norm(grads, self.max_grad_norm)
        lr = self.lr
        if isinstance(lr, (list, tuple)):
            lr = lr[min(step, len(lr) - 1)]
        if isinstance(lr, Mapping):
            return {k: fast[k] - lr[k] * grads[k] for k in fast}, state
        if isinstance(lr, torch.Tensor) and lr.ndim == 1:
            lr = lr[min(step, lr.shape[0] - 1)]
        if isinstance(lr, (int, float)) and not torch.compiler.is_compiling():
            # One fused op per parameter. Not when compiling: Inductor (torch 2.13) miscompiles
            # add's alpha after torch.func.grad_and_value (silently wrong iterates).
            return {k: torch.add(fast[k], grads[k], alpha=-lr) for k in fast}, state
        return {k: fast[k] - lr * grads[k] for k in fast}, state


class Adam(InnerOptimizer):
    """Adam with bias correction (Reptile's reference code uses ``betas=(0, 0.999)``)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.0, 0.999),
                 eps: float = 1e-8) -> None:
        if lr <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps <= 0:
            raise ValueError(f"Adam needs lr > 0, betas in [0, 1) and eps > 0; got {lr}, {betas}, {eps}")
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, fast: Params) -> Any:
        return ({k: torch.zeros_like(v) for k, v in fast.items()},
                {k: torch.zeros_like(v) for k, v in fast.items()})

    def step(self, fast: Params, grads: Params, state: Any, step: int) -> tuple[Params, Any]:
        (b1, b2), (m, v), t = self.betas, state, step + 1
        m = {k: b1 * m[k] + (1 - b1) * grads[k] for k in fast}
        v = {k: b2 * v[k] + (1 - b2) * grads[k] ** 2 for k in fast}
        new = {k: fast[k] - self.lr * (m[k] / (1 - b1 ** t))
               / ((v[k] / (1 - b2 ** t)).sqrt() + self.eps) for k in fast}
        return new, (m, v)


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


def _pure_forward(backbone: nn.Module) -> Callable[..., Any] | None:
    """The backbone's ``functional_forward`` when it computes the backbone's forward: not when
    a subclass overrides ``forward`` below the class that defines ``functional_forward`` (the
    override would be silently skipped)."""
    mro = type(backbone).__mro__
    pure = next((c for c in mro if "functional_forward" in c.__dict__), None)
    forward = next((c for c in mro if "forward" in c.__dict__), None)
    if pure is None or forward is None or not issubclass(pure, forward):
        return None
    return backbone.functional_forward


def _pure_encode(backbone: nn.Module) -> Callable[..., Any] | None:
    """The backbone's pure encoder, ``functional_forward(params, features, encode_only=True)``,
    when its ``functional_forward`` is pure (:func:`_pure_forward`) and takes ``encode_only``."""
    pure = _pure_forward(backbone)
    if pure is None or "encode_only" not in inspect.signature(pure).parameters:
        return None
    return functools.partial(pure, encode_only=True)


class _Method(nn.Module):
    """``forward`` = one named method of a module: lets ``functional_call`` run any method."""

    def __init__(self, backbone: nn.Module, method: str) -> None:
        super().__init__()
        self.backbone, self.method = backbone, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.backbone, self.method)(*args, **kwargs)



def vmap_tasks(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``vmap(fn, randomness="different")`` over the tasks (leading dim) of every argument,
    except that a batch of one task calls ``fn`` on it directly (then adds the task dim back):
    the same numbers without vmap's per-call overhead, which dominates a deployed user's
    adaptation (a single-user adapt runs about 2x faster unvmapped)."""
    batched = vmap(fn, randomness="different")

    def run(*args: Any) -> Any:
        one = _single_task(args)
        if one is None:
            return batched(*args)
        return _with_task_dim(fn(*one))

    return run


def _with_task_dim(out: Any) -> Any:
    """``out`` (tensors, dicts of tensors, and lists or tuples of those, e.g. a trajectory and
    its losses) with a task dim of 1 added to every tensor; pytree for anything else."""
    if type(out) is torch.Tensor:
        return out.unsqueeze(0)
    if _tensor_dict(out):
        return {k: v.unsqueeze(0) for k, v in out.items()}
    if type(out) in (list, tuple):
        return type(out)(_with_task_dim(x) for x in out)
    return tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, out)


def _tensor_dict(x: Any) -> bool:
    return type(x) is dict and all(type(v) is torch.Tensor for v in x.values())


def _single_task(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``args`` without their task dim when every tensor in them has a task dim of 1 (and
    there is one), else None. Dicts of tensors (feature batches, parameters), the common case,
    skip pytree's flatten/unflatten: their cost is a good part of a deployed user's call."""
    if all(_tensor_dict(a) for a in args):
        leaves = [v for a in args for v in a.values()]
        if not leaves or any(v.ndim == 0 or v.shape[0] != 1 for v in leaves):
            return None
        return tuple({k: v[0] for k, v in a.items()} for a in args)
    leaves = [x for x in tree_flatten(args)[0] if isinstance(x, torch.Tensor)]
    if not leaves or any(x.ndim == 0 or x.shape[0] != 1 for x in leaves):
        return None
    return tree_map(lambda x: x[0] if isinstance(x, torch.Tensor) else x, args)


def _plain() -> bool:
    """Whether this runs outside every torch.func transform, compiler and inference mode: plain
    autograd can then take a first-order inner step (the single-task path of
    :func:`vmap_tasks`)."""
    return (torch._C._functorch.maybe_current_level() is None
            and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled())


def _first_order_grad(objective: Objective
                      ) -> Callable[[Params, FeatureBatch], tuple[Params, torch.Tensor]]:
    """``grad_and_value(objective)`` detached, computed by plain ``torch.autograd.grad`` on
    detached copies of the fast parameters: the same gradients as ``torch.func.grad`` (an
    unused parameter's is zeros, as there) without its per-call wrapping, which dominates a
    deployed user's few small steps. Only for first-order steps outside any functorch
    transform."""
    def loss_grad(fast: Params, support: FeatureBatch) -> tuple[Params, torch.Tensor]:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in fast.items()}
            loss = objective(leaves, support)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return {k: torch.zeros_like(v) if g is None else g
                for (k, v), g in zip(leaves.items(), grads)}, loss.detach()

    return loss_grad


class FunctionalModel:
    """A backbone seen as pure functions of (fast, slow) parameter dicts."""

    def __init__(self, backbone: nn.Module, fast_names: Sequence[str], feedback: str) -> None:
        if not fast_names:
            raise ValueError(f"{type(backbone).__name__} has no fast parameters to adapt")
        self.backbone = backbone
        self.fast_names = tuple(fast_names)
        self.feedback = feedback
        encoder = getattr(backbone, "encoder_parameters", lambda: [])()
        # Encode once per task when the encoder holds no fast parameter (see Backbone).
        self.encodes = bool(encoder) and not any(
            fnmatch.fnmatchcase(n, p) for n in self.fast_names for p in encoder)
        self._encode = _pure_encode(backbone) if self.encodes else None  # found once

    def prepare(self, slow: Params, batch: FeatureBatch) -> FeatureBatch:
        """``batch`` plus the backbone's slow-only encoding of it, when the backbone has one."""
        if not self.encodes or ENCODED in batch:
            return batch
        if self._encode is not None:
            encoded = self._encode(slow, inputs(batch))
            if encoded is not NotImplemented:
                return {**batch, ENCODED: encoded}
        buffers = dict(self.backbone.named_buffers())
        encoded = functional_call(self.backbone, (slow, buffers), (inputs(batch),),
                                  {"encode_only": True})
        return {**batch, ENCODED: encoded}

    @property
    def conditions_start(self) -> bool:
        """Whether the backbone maps a task's support set to its start (``task_start``)."""
        return callable(getattr(self.backbone, "task_start", None))

    def call(self, method: str, fast: Params, slow: Params, *args: Any, **kwargs: Any) -> Any:
        """Run the backbone's method ``method`` as a pure function of (fast, slow) parameters,
        as :meth:`predict` runs its forward (any method, e.g. an amortised task encoder)."""
        buffers = {f"backbone.{k}": v for k, v in self.backbone.named_buffers()}
        params = {f"backbone.{k}": v for k, v in {**slow, **fast}.items()}
        return functional_call(_Method(self.backbone, method), (params, buffers), args, kwargs)

    def task_start(self, fast: Params, slow: Params, support: FeatureBatch) -> Params:
        """One task's start of adaptation: the backbone's ``task_start(support)`` (fast values
        computed from the support set, e.g. TaNP's latent task code) when it defines one,
        else ``fast`` itself (the shared, meta-learned start)."""
        if not self.conditions_start:
            return fast
        return {**fast, **self.call("task_start", fast, slow, support)}

    def split(self) -> tuple[Params, Params]:
        """The live (fast, slow) parameters: autograd reaches the backbone through them."""
        fast, slow = {}, {}
        for name, p in self.backbone.named_parameters():
            (fast if name in self.fast_names else slow)[name] = p
        return fast, slow

    def predict(self, fast: Params, slow: Params, batch: FeatureBatch) -> torch.Tensor:
        """Scores for a feature batch under the given parameters (any leading dims).

        A backbone may define ``functional_forward(params, features)``, its forward as a pure
        function of a parameter dict (e.g. MeLU's): it is used instead of ``functional_call``,
        which re-binds every module parameter on each call, unless it returns NotImplemented."""
        pure = _pure_forward(self.backbone)
        if pure is not None:
            scores = pure({**slow, **fast}, inputs(batch))
            if scores is not NotImplemented:
                return scores
        buffers = dict(self.backbone.named_buffers())
        return functional_call(self.backbone, ({**slow, **fast}, buffers), (inputs(batch),))

    def loss(self, fast: Params, slow: Params, batch: FeatureBatch) -> torch.Tensor:
        """Masked loss of one task (or of all tasks at once, averaged over entries)."""
        scores = self.predict(fast, slow, batch)
        return masked_loss(scores, batch["label"], batch["mask"], self.feedback)

    def adapt(self, fast: Params, slow: Params, support: FeatureBatch, steps: int,
              optimizer: InnerOptimizer, *, objective: Objective | None = None,
              first_order: bool = False, trajectory: bool = False,
              support_losses: bool = False) -> Any:
        """Run ``steps`` inner updates on one task's support set.

        ``objective(fast, support)`` is the inner loss (default: the support loss). Gradients
        come from ``torch.func.grad``; the result stays differentiable with respect to ``fast``
        (second order) unless ``first_order`` detaches the inner gradients. Returns the adapted
        parameters, or every iterate (steps ``0..steps``) when ``trajectory`` is set; with
        ``support_losses``, also the support loss of every iterate, ``(steps + 1,)``, detached
        (what the divergence guard reads): with the default objective, the values its
        gradients were taken at, plus one loss of the last iterate.
        """
        support_loss = lambda f, batch: self.loss(f, slow, batch)  # noqa: E731
        custom = objective is not None
        objective = objective or support_loss
        support = self.prepare(slow, support)  # encoded once, reused by every inner step
        loss_grad = (_first_order_grad(objective) if first_order and _plain()
                     else grad_and_value(objective))
        state = optimizer.init(fast)
        iterates, losses = [fast], []
        for step in range(steps):
            grads, value = loss_grad(fast, support)
            if support_losses:
                losses.append(support_loss(fast, support) if custom else value)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast, state = optimizer.step(fast, grads, state, step)
            if trajectory:
                iterates.append(fast)
        result = iterates if trajectory else fast
        if not support_losses:
            return result
        losses.append(support_loss(fast, support))
        return result, torch.stack([v.detach() for v in losses])

    def adapt_tasks(self, fast: Params, slow: Params, support: FeatureBatch, steps: int,
                    optimizer: InnerOptimizer, **kwargs: Any) -> Params | list[Params]:
        """:meth:`adapt` vmapped across the tasks of a batch (leading dim of ``support``)."""
        return vmap_tasks(lambda task: self.adapt(fast, slow, task, steps, optimizer,
                                                  **kwargs))(support)

    def predict_tasks(self, fast: Params, slow: Params, batch: FeatureBatch) -> torch.Tensor:
        """Per-task scores ``(B, N)`` with per-task fast parameters (leading dim B)."""
        return vmap_tasks(lambda f, b: self.predict(f, slow, b))(fast, batch)

    def loss_tasks(self, fast: Params, slow: Params, batch: FeatureBatch) -> torch.Tensor:
        """Per-task losses ``(B,)`` with per-task fast parameters (leading dim B)."""
        return vmap_tasks(lambda f, b: self.loss(f, slow, b))(fast, batch)
