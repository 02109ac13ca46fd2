"""learn2learn side of ``benchmarks/meta_train_throughput.py`` (run with a learn2learn venv).

Self-contained on purpose: it must not import metarec (the learn2learn venv does not have
it, and has a different torch). It rebuilds MeLU's math from the parameter names of the state
dict it is given and meta-trains it with the standard learn2learn second-order MAML loop:

    maml = learn2learn.algorithms.MAML(head, lr=inner_lr, first_order=False)
    for task in batch:
        learner = maml.clone()
        for _ in range(inner_steps):
            learner.adapt(mse(learner(support_embeddings), support_labels))
        outer += mse(learner(query_embeddings), query_labels)
    (outer / len(batch)).backward()

Which parameters adapt: as in MeLU (and metarec's ``melu`` backbone), only the decision and
output layers (the *head*) are wrapped in ``l2l.algorithms.MAML`` and adapted per task; the
feature embeddings are slow. The embeddings of a task's support and query sets are computed
once per task, outside the clone (the usual learn2learn/ANIL pattern), and reused by every
inner step; gradients still flow from the outer loss into the embedding tables through the
second-order inner steps. (metarec re-runs the full backbone, embeddings included, at every
inner step; the meta-gradient is the same.)

Protocol (all on stdout, one JSON object per line):
- on start: loads the payload, computes the meta-gradient of batch 0 and saves it (a
  ``{name: tensor}`` dict, with metarec's parameter names) to ``--grad-out``, runs
  ``--warmup`` untimed passes over all batches, then prints ``{"ready": true, ...}``;
- with ``--serve``: for every line ``run`` read on stdin, times one pass over all batches and
  prints ``{"seconds": s, "tasks": n, "tasks_per_s": n / s}``; ``quit`` (or EOF) ends it;
- without ``--serve``: runs ``--repeats`` timed passes and prints one summary line with the
  median ``tasks_per_s``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Embedder(nn.Module):
    """MeLU's slow part: one table per feature; multi-hot features average their rows."""

    def __init__(self, specs: list[dict], dim: int) -> None:
        super().__init__()
        self.specs = specs
        self.embeddings = nn.ModuleDict()
        for s in specs:
            name = s["key"].replace(".", "__")
            self.embeddings[name] = (nn.Embedding(s["cardinality"], dim)
                                     if s["kind"] == "categorical"
                                     else nn.Linear(s["cardinality"], dim, bias=False))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for s in self.specs:
            table = self.embeddings[s["key"].replace(".", "__")]
            x = features[s["key"]]
            if s["kind"] == "categorical":
                parts.append(table(x))
            else:
                x = x.to(table.weight.dtype)
                parts.append(table(x) / x.sum(-1, keepdim=True).clamp_min(1.0))
        return torch.cat(parts, dim=-1)


class Head(nn.Module):
    """MeLU's fast part: decision layers (Linear + ReLU) and the linear output layer."""

    def __init__(self, width: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, h in enumerate(hidden):
            layers += [nn.Linear(width if i == 0 else hidden[i - 1], h), nn.ReLU()]
        self.decision = nn.Sequential(*layers)
        self.output = nn.Linear(hidden[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.decision(x)).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("payload", help="torch.save'd dict written by meta_train_throughput.py")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--grad-out", default=None, help="where to save batch 0's meta-gradient")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    with warnings.catch_warnings():  # learn2learn imports gym/torchvision, which warn a lot
        warnings.simplefilter("ignore")
        import learn2learn as l2l

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    payload = torch.load(args.payload, weights_only=True)
    cfg = payload["config"]
    specs, state = cfg["specs"], payload["state_dict"]

    embedder = Embedder(specs, cfg["embedding_dim"])
    head = Head(cfg["embedding_dim"] * len(specs), list(cfg["hidden"]))
    embedder.load_state_dict({k: v for k, v in state.items() if k.startswith("embeddings.")})
    head.load_state_dict({k: v for k, v in state.items() if not k.startswith("embeddings.")})
    maml = l2l.algorithms.MAML(head, lr=cfg["inner_lr"], first_order=False)
    steps = cfg["inner_steps"]
    batches = payload["batches"]  # list of batches; a batch is a list of (support, query) dicts

    def meta_step(batch) -> torch.Tensor:
        embedder.zero_grad(set_to_none=True)
        maml.zero_grad(set_to_none=True)
        outer = 0.0
        for support, query in batch:
            learner = maml.clone()
            es, eq = embedder(support), embedder(query)
            for _ in range(steps):
                learner.adapt(F.mse_loss(learner(es), support["label"]))
            outer = outer + F.mse_loss(learner(eq), query["label"])
        loss = outer / len(batch)
        loss.backward()
        return loss

    meta_step(batches[0])
    if args.grad_out:
        # Same names as metarec's MeLU: "embeddings.user__age.weight", "decision.0.bias", ...
        grads = {k: p.grad for k, p in embedder.named_parameters()}
        grads.update({k: p.grad for k, p in head.named_parameters()})
        torch.save({k: g.detach().clone() for k, g in grads.items()}, args.grad_out)
    for _ in range(args.warmup):
        for b in batches:
            meta_step(b)

    n_tasks = sum(len(b) for b in batches)

    def timed_pass() -> dict:
        gc.collect()
        t0 = time.perf_counter()
        for b in batches:
            meta_step(b)
        s = time.perf_counter() - t0
        return {"seconds": s, "tasks": n_tasks, "tasks_per_s": n_tasks / s}

    emit({"ready": True, "torch": torch.__version__, "learn2learn": l2l.__version__,
          "threads": torch.get_num_threads(), "tasks": n_tasks})
    if args.serve:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "run":
                emit(timed_pass())
            elif cmd in ("quit", ""):
                break
            else:
                emit({"error": f"unknown command {cmd!r}"})
    else:
        runs = [timed_pass()["tasks_per_s"] for _ in range(args.repeats)]
        emit({"tasks_per_s": statistics.median(runs), "runs": runs})


if __name__ == "__main__":
    main()
