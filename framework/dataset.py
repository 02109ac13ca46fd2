"""The dataset interface: produces an :class:`~metarec.data.InteractionTable`."""

from __future__ import annotations

from metarec.data.table import InteractionTable


class Dataset:
    """A source of interactions plus user/item features, from files or a generator.

    Subclasses take their options as constructor arguments (set from a recipe's
    ``data.dataset_args``) and implement :meth:`load`.
    """

    def load(self) -> InteractionTable:  # pragma: no cover - interface
        raise NotImplementedError
