"""The backbone interface: a recommender that scores (user, item) pairs."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from metarec.schema import DataSchema


class Backbone(nn.Module):
    """Scores (user, item) pairs from a feature batch with any leading dimensions.

    ``forward(features)`` takes a mapping of tensors shaped ``(*lead, ...)`` (see
    :mod:`metarec.data.episodes` for the keys) and returns scores shaped ``(*lead,)``: a
    predicted rating in explicit mode, a logit in implicit mode. It must be a pure function
    of its parameters and inputs so that it runs unchanged under ``torch.func.vmap``.

    ``default_fast_parameters`` names (as ``fnmatch`` patterns) the parameters adapted per
    task; everything else is slow (shared). Never make a whole embedding table fast.
    """

    def __init__(self, schema: DataSchema) -> None:
        super().__init__()
        self.schema = schema

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def default_fast_parameters(self) -> list[str]:
        """Patterns of the parameters adapted per task by default."""
        raise NotImplementedError

    def encoder_parameters(self) -> list[str]:
        """Optional fast path: patterns of the parameters of the backbone's *encoder*.

        A backbone whose forward is ``head(encode(features))`` can declare the parameters
        ``encode`` uses and accept ``forward(features, encode_only=True)`` (returning the
        encoding) and a precomputed encoding under ``features[ENCODED]``. When no fast parameter
        is an encoder parameter, the inner loop encodes each task once instead of at every
        inner step (the encoding depends only on slow parameters). Default: no encoder.
        """
        return []

    def head_parameters(self) -> list[str]:
        """Patterns of the output head (what ANIL adapts). Default: the last module that owns
        parameters directly, e.g. the final ``nn.Linear``."""
        owners = [name for name, m in self.named_modules()
                  if name and any(True for _ in m.parameters(recurse=False))]
        if not owners:
            raise NotImplementedError(f"{type(self).__name__} has no parameterised submodule")
        return [f"{owners[-1]}.*"]
