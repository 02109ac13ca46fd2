"""Multi-hot features as bags of category ids: a sparse gather instead of a dense multiply.

A multi-hot feature reaches a backbone in one of two forms (see :mod:`metarec.data.episodes`):

- *dense*: a 0/1 floating (or bool) vector of width ``cardinality``, ``(*lead, K)``: the
  documented default, what every collator and the :class:`metarec.Adapter` produce;
- *bag*: the ids of its active categories, an integer tensor ``(*lead, L)`` padded with ``-1``
  (``L`` = the most categories any row of the table has), from ``data.multihot_bags: true``
  (``EpisodeCollator(..., bags=True)``, built once per table by
  ``metarec.data.episodes.to_bags``).

:func:`bag_mean` gives the mean of the active categories' embedding rows (zeros when none) for
either form: the dense form as the product ``x @ rows / count`` it always was; the bag form as a
gather of ``L`` rows, masked and summed, i.e. what ``nn.EmbeddingBag(mode="mean")`` computes
(``torch.nn.functional.embedding_bag`` itself has no ``vmap`` batching rule in torch 2.13: it
falls back to a per-sample loop, so it is not used). Both forms give the same values (up to
float rounding) and the same gradients; the bag form touches ``L`` rows per slot instead of
multiplying by all ``K``, and a batch carries ``L`` ids per slot instead of ``K`` floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_bag(x: torch.Tensor) -> bool:
    """Whether a multi-hot input is in bag form (integer ids, ``-1`` padding)."""
    return not (x.is_floating_point() or x.dtype == torch.bool)


def bag_mean(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of the embedding ``rows`` ``(K, D)`` of the active categories of ``x``.

    ``x`` is dense ``(*lead, K)`` 0/1 or a bag ``(*lead, L)`` of ids (``-1`` = padding); returns
    ``(*lead, D)``, zeros for a row with no active category. Runs under ``vmap`` and ``grad``.
    """
    if not is_bag(x):
        x = x.to(rows.dtype)
        return (x @ rows) / x.sum(-1, keepdim=True).clamp_min(1.0)
    valid = x >= 0
    gathered = F.embedding(x.clamp_min(0), rows)  # (*lead, L, D)
    weight = valid.to(rows.dtype)
    total = (gathered * weight[..., None]).sum(-2)
    return total / weight.sum(-1, keepdim=True).clamp_min(1.0)
