"""First-order MAML (Finn et al., 2017, section 5.2): MAML without second-order terms.

The meta-gradient is the query-loss gradient at the adapted parameters, applied to the
initialisation; the inner-loop gradients are treated as constants.
"""

from __future__ import annotations

from collections.abc import Sequence

from metarec import NonNegativeInt, PositiveFloat
from metarec_plugins.algorithms.maml import MAML


class FOMAML(MAML):
    """MAML with ``first_order=True``; same arguments otherwise."""

    def __init__(self, inner_steps: NonNegativeInt = 5, inner_lr: PositiveFloat = 0.01,
                 learn_inner_lr: bool = False,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, first_order=True, learn_inner_lr=learn_inner_lr,
                         fast_parameters=fast_parameters)
