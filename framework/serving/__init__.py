"""Serving adapted models: the pieces :class:`metarec.Adapter` is built from, one job each, and
written for any entity: users, or items when a model is trained with tasks per item
(``data.tasks.task_by: item``).

- :mod:`~metarec.serving.ids`: raw id <-> contiguous id codecs (:class:`IdCodec`), one per
  entity kind;
- :mod:`~metarec.serving.features`: per-entity feature tables and one entity's feature row,
  validated (:class:`FeatureTables`);
- :mod:`~metarec.serving.events`: feedback events ``(other, label[, timestamp])`` parsed and
  validated (:func:`parse_events`), and histories (:func:`histories`) computed as training does;
- :mod:`~metarec.serving.session`: one adapted entity's state (:class:`Session`: a
  :class:`UserSession`, or an :class:`ItemSession` with tasks per item) and its top-k
  (:class:`Recommendations` of items, :class:`RankedUsers` of users);
- :mod:`~metarec.serving.command`: ``metarec adapt`` (read an interactions file, print top-k).

:mod:`metarec.adapter` assembles them: checkpoint loading, padded support batches and the
policy call.
"""

from metarec.serving.events import histories, parse_events
from metarec.serving.features import FeatureTables
from metarec.serving.ids import IdCodec
from metarec.serving.session import (
    ItemSession,
    RankedUsers,
    Recommendations,
    Session,
    UserSession,
)

__all__ = ["FeatureTables", "IdCodec", "ItemSession", "RankedUsers", "Recommendations", "Session",
           "UserSession", "histories", "parse_events"]
