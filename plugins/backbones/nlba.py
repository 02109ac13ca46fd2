"""NLBA: Non-Linear Bias Adaptation (Vartak, Thiagarajan, Miranda, Bratman and Larochelle,
NeurIPS 2017: "A Meta-Learning Perspective on Cold-Start Recommendations for Items", Sec. 3.2).

As :mod:`metarec_plugins.backbones.lwa` (tasks per item, history = the item's users and labels,
class representatives ``R_0``, ``R_1`` of their embeddings ``F(u)``), but the item's classifier
is a neural network whose *weights* are shared by all items and whose *biases* are adapted to
the item, each a linear function of the representatives:

    h_0 = F(u)
    h_l = relu(W_l h_{l-1} + V_l^0 R_0 + V_l^1 R_1),   l = 1..L
    P(y = 1 | u, i) = sigmoid(w . h_L + v^0 . R_0 + v^1 . R_1)

``W_l``, ``V_l^c``, ``w``, ``v^c`` and ``F`` are learned across items; the biases (one vector
per hidden layer and the output's scalar) are the task state, computed from the support set by
:meth:`NLBA.task_start` (train with ``maml`` and ``inner_steps: 0``). Needs implicit labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarec import Backbone, DataSchema, FeatureBatch, PositiveInt
from metarec_plugins.backbones.lwa import HistoryEncoder, _check_implicit, class_representatives


class NLBA(Backbone):
    """Non-Linear Bias Adaptation.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: width of each feature (and id) embedding of a history entity.
        encoder_hidden: hidden widths of ``F``.
        out_dim: width of ``F(u)``.
        hidden: widths of the classifier's hidden layers (the paper: 2 layers).
        use_ids: embed the history entities' ids too.
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 16,
                 encoder_hidden: Sequence[PositiveInt] = (32,), out_dim: PositiveInt = 16,
                 hidden: Sequence[PositiveInt] = (32, 16), use_ids: bool = True) -> None:
        super().__init__(schema)
        _check_implicit(schema, "nlba")
        if not hidden:
            raise ValueError("nlba needs at least one hidden layer")
        self.encoder = HistoryEncoder(schema, embedding_dim, encoder_hidden, out_dim, use_ids)
        widths = [out_dim, *[int(h) for h in hidden]]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False)
                                    for a, b in zip(widths[:-1], widths[1:]))
        # V_l^0, V_l^1 as one (2d -> width) map of [R_0 ; R_1] per layer, and the output's v^c.
        self.bias_maps = nn.ModuleList(nn.Linear(2 * out_dim, b, bias=False)
                                       for b in widths[1:])
        self.output = nn.Linear(widths[-1], 1, bias=False)
        self.output_bias_map = nn.Linear(2 * out_dim, 1, bias=False)
        # The fast task state: one bias per hidden layer and the output's, computed per task.
        self.task_biases = nn.ParameterList(nn.Parameter(torch.zeros(b)) for b in widths[1:])
        self.task_output_bias = nn.Parameter(torch.zeros(()))

    def task_start(self, support: FeatureBatch) -> dict[str, torch.Tensor]:
        """Every adapted bias from one task's support set."""
        r0, r1 = class_representatives(self.encoder(support), support["label"], support["mask"])
        r = torch.cat([r0, r1], -1)
        out = {f"task_biases.{i}": m(r) for i, m in enumerate(self.bias_maps)}
        out["task_output_bias"] = self.output_bias_map(r).squeeze(-1)
        return out

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = self.encoder(features)
        for layer, bias in zip(self.layers, self.task_biases):
            h = F.relu(layer(h) + bias)
        return self.output(h).squeeze(-1) + self.task_output_bias

    def default_fast_parameters(self) -> list[str]:
        return ["task_biases.*", "task_output_bias"]

    def head_parameters(self) -> list[str]:
        return ["task_output_bias"]
