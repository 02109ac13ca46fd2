"""Raw ids <-> the contiguous ids a model was trained with, for one kind of entity."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch


class IdCodec:
    """The ids of one entity kind (``"user"`` or ``"item"``): ``count`` contiguous ids, and the
    raw id of each (``keys[i]`` is id ``i``'s) when the checkpoint stores them."""

    def __init__(self, entity: str, count: int, keys: Sequence[Hashable] | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.entity, self.count, self.device = entity, int(count), torch.device(device)
        self.keys = None if keys is None else list(keys)
        if self.keys is not None and len(self.keys) != self.count:
            raise ValueError(f"{entity}_keys has {len(self.keys)} entries, the model has "
                             f"{self.count}")
        self._index: dict[Hashable, int] | None = None

    def _lookup(self) -> dict[Hashable, int]:
        if self.keys is None:
            raise ValueError(f"this checkpoint stores no raw {self.entity} ids: use contiguous ids")
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def encode(self, raw: Hashable) -> int:
        """The contiguous id of one raw id (KeyError if unknown)."""
        index = self._lookup()
        if raw not in index:
            raise KeyError(f"unknown {self.entity} id {raw!r}: not among the model's "
                           f"{self.count} {self.entity}s")
        return index[raw]

    def encode_many(self, raw: Sequence[Hashable]) -> torch.Tensor:
        """Contiguous ids of raw ids (KeyError naming the first unknown one)."""
        index = self._lookup()
        for position, key in enumerate(raw):
            if key not in index:
                raise KeyError(f"unknown {self.entity} id {key!r} at position {position}: not "
                               f"among the model's {self.count} {self.entity}s")
        return torch.tensor([index[k] for k in raw], dtype=torch.long, device=self.device)

    def decode(self, ids: Any) -> list[Hashable]:
        """Raw ids of contiguous ids (the ids themselves when no keys are stored)."""
        out = [int(i) for i in ids]
        return out if self.keys is None else [self.keys[i] for i in out]

    def decode_one(self, i: int) -> Hashable:
        return int(i) if self.keys is None else self.keys[int(i)]

    def check(self, ids: Any, where: str) -> torch.Tensor:
        """A 1-D tensor of contiguous ids, validated (a clear error naming the first bad one)."""
        out = torch.as_tensor(ids, device=self.device)
        if out.ndim != 1 or (out.numel() and (out.is_floating_point() or out.dtype == torch.bool)):
            raise ValueError(f"{where}: expected a 1-D sequence of integer {self.entity} ids, "
                             f"got {tuple(out.shape)} {out.dtype}")
        out = out.long()
        outside = (out < 0) | (out >= self.count)
        if bool(outside.any()):
            bad = int(torch.nonzero(outside)[0])
            raise ValueError(f"{where}[{bad}]: {self.entity} {int(out[bad])} is not a contiguous "
                             f"{self.entity} id in [0, {self.count})")
        return out

    def check_one(self, i: Any) -> int:
        """One contiguous id, validated."""
        import numpy as np

        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) \
                or not 0 <= int(i) < self.count:
            raise ValueError(f"{self.entity} {i!r} is not a contiguous {self.entity} id in "
                             f"[0, {self.count})" + (f"; map raw ids with adapter.encode_"
                                                     f"{self.entity}" if self.keys is not None
                                                     else ""))
        return int(i)
