"""ANIL (Raghu, Raghu, Bengio and Vinyals, ICLR 2020: "Rapid Learning or Feature Reuse?").

"Almost No Inner Loop": MAML in which only the network's head adapts in the inner loop; the
body is learned only by the outer loop. It is MAML with a head selector: the backbone's
``head_parameters()`` (MeLU: the output layer) unless ``fast_parameters`` overrides them.
"""

from __future__ import annotations

from torch import nn

from metarec_plugins.algorithms.maml import MAML


class ANIL(MAML):
    """MAML adapting only the head. Same arguments as ``maml``."""

    def select_fast(self, backbone: nn.Module) -> list[str]:
        return self.fast_parameters or backbone.head_parameters()
