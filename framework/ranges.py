"""Range-restricted number types for plugin signatures.

A plugin parameter annotated with one of these is checked when a recipe is *parsed*
(``registry.validate_args``, called by the CLI before anything is built): ``inner_lr: 0`` in a
recipe is a parse error naming the key and the plugin, not a failure deep in training. At run
time they are plain ``int``/``float`` annotations, so direct Python calls are unaffected; keep
the constructor's own checks for those. They are jsonargparse's restricted types; the float
ones here are finite (``inf`` and ``nan`` are rejected), each defined once (jsonargparse
registers a type by name).
"""

from __future__ import annotations

import math

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeInt,
    PositiveInt,
    restricted_number_type,
)

#: A finite float > 0 (jsonargparse's ``PositiveFloat`` admits ``inf``): learning rates, scales.
PositiveFloat = restricted_number_type("PositiveFloat_finite", float,
                                       [(">", 0), ("<", math.inf)],
                                       docstring="finite float restricted to be >0")
#: A finite float >= 0.
NonNegativeFloat = restricted_number_type("NonNegativeFloat_finite", float,
                                          [(">=", 0), ("<", math.inf)],
                                          docstring="finite float restricted to be >=0")
#: A float in ``[0, 1)``: dropout rates, pull-back strengths, target ratios.
UnitFraction = restricted_number_type("UnitFraction", float, [(">=", 0.0), ("<", 1.0)],
                                      docstring="float restricted to be >=0 and <1")

__all__ = ["ClosedUnitInterval", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat",
           "PositiveInt", "UnitFraction"]
