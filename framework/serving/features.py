"""Side-information tables of one entity kind, and one entity's feature row, validated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from metarec.schema import DataSchema, FeatureSpec


def feature_value(spec: FeatureSpec, value: Any, device: torch.device) -> torch.Tensor:
    """One feature value as the model reads it: a categorical code or a multi-hot vector."""
    if spec.kind == "categorical":
        code = int(value)
        if code != value or not 0 <= code < spec.cardinality:
            raise ValueError(f"{spec.key}: expected a code in [0, {spec.cardinality}), "
                             f"got {value!r}")
        return torch.tensor(code, dtype=torch.long, device=device)
    vec = torch.as_tensor(value, dtype=torch.float32, device=device)
    if vec.shape != (spec.cardinality,):
        raise ValueError(f"{spec.key}: expected a multi-hot vector of {spec.cardinality}, "
                         f"got shape {tuple(vec.shape)}")
    return vec


class FeatureTables:
    """The ``owner``'s (``"user"`` or ``"item"``) feature tables: ``tables[key]`` is
    ``(count,)`` codes or ``(count, cardinality)`` multi-hot rows, one per feature of the
    schema. ``given`` None means no tables (an error when ``required`` and the schema has
    features of this owner)."""

    def __init__(self, schema: DataSchema, owner: str, given: Mapping[str, Any] | None,
                 count: int, device: torch.device, required: bool) -> None:
        self.owner, self.device = owner, device
        self.specs = schema.of(owner)  # type: ignore[arg-type]
        self.tables: dict[str, torch.Tensor] = {}
        if given is None:
            if required and self.specs:
                raise ValueError(f"the model needs {owner} feature tables "
                                 f"{[s.key for s in self.specs]}: pass {owner}_features=")
            return
        for spec in self.specs:
            if spec.key not in given:
                raise ValueError(f"{owner}_features lacks {spec.key!r}; needs "
                                 f"{[s.key for s in self.specs]}")
            dtype = torch.long if spec.kind == "categorical" else torch.float32
            table = torch.as_tensor(given[spec.key], dtype=dtype).to(device)
            want = (count,) if spec.kind == "categorical" else (count, spec.cardinality)
            if tuple(table.shape) != want:
                raise ValueError(f"{owner}_features[{spec.key!r}] has shape "
                                 f"{tuple(table.shape)}, expected {want}")
            self.tables[spec.key] = table

    def gather(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every feature of the entities ``ids`` (any shape), from the tables."""
        return {key: table[ids] for key, table in self.tables.items()}

    def row(self, entity: int | None,
            overrides: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """``{"<owner>.<name>": value}`` of one entity: the stored row of ``entity``, with
        ``overrides`` (names with or without the ``<owner>.`` prefix) applied and validated; an
        entity without a row (``None``) must be given every feature."""
        prefix = f"{self.owner}."
        given = {(name if name.startswith(prefix) else prefix + name): value
                 for name, value in (overrides or {}).items()}
        specs = {s.key: s for s in self.specs}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise ValueError(f"unknown {self.owner} feature(s) {unknown}; the model's are "
                             f"{sorted(specs)}")
        values: dict[str, torch.Tensor] = {}
        for key, spec in specs.items():
            if key in given:
                values[key] = feature_value(spec, given[key], self.device)
            elif entity is not None and key in self.tables:
                values[key] = self.tables[key][entity]
            else:
                raise ValueError(f"{self.owner} feature {key!r} is needed: " + (
                    f"pass {self.owner}=<contiguous id> or {self.owner}_features={{...}}"
                    if entity is None else f"this adapter has no {self.owner} feature tables; "
                    f"pass {self.owner}_features={{...}}"))
        return values
