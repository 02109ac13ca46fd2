"""TaNP backbone (Lin, Wu, Zhou, Pan, Cao and Wang, WWW 2021: "Task-adaptive Neural Process for
User Cold-Start Recommendation").

TaNP is a neural process: every user (task ``i``) is a function from items to ratings, and the
model maps the user's observed interactions (the support set ``S_i``) straight to a predictive
distribution over the ratings of other items. There is no inner gradient loop: adaptation is
amortised, one forward pass of the encoders over the support set. The paper's three parts
(its Figure 2) are here, in the order a prediction computes them:

**Inputs.** ``x_ij = [u_i ; v_j]``: the concatenated embeddings of the user's and the item's
side information (one table per categorical feature; a multi-hot feature such as genres is the
mean of its categories' embeddings, as in MeLU), optionally with id embeddings. A label enters
the encoders as ``y~ = (y - mid) / half`` (ratings rescaled to [-1, 1]; 0/1 for implicit data),
an input normalisation that changes nothing the first layer could not absorb.

**Encoder h_theta (the latent path).** Each pair is encoded, ``r_ij = h_theta([x_ij ; y~_ij])``
(an MLP), and the pairs are aggregated by their mean, ``r_i = (1/n) sum_j r_ij`` (permutation
invariant, any number of interactions). The latent variable of the task is Gaussian,

    s_i = ReLU(W_s r_i + b_s),  mu_i = W_mu s_i + b_mu,  log sigma_i^2 = W_v s_i + b_v,
    z_i = mu_i + sigma_i * eps,  eps ~ N(0, I)            (the reparameterisation trick)

``q(z_i | C)`` for any set ``C`` of interactions (:meth:`TaNP.latent`): the variational prior
is ``q(z_i | S_i)`` and, during training, the posterior is ``q(z_i | tau_i)`` over the whole
task (support and query); the objective and its KL term are in
:mod:`metarec_plugins.algorithms.tanp`. ``z`` is sampled while the module is training and is
its mean ``mu_i`` in eval mode, so evaluation is deterministic.

**Customisation module (task identity network m_phi and global pool A).** A second MLP
encodes the same pairs into the task identity ``t_i = (1/n) sum_j m_phi([x_ij ; y~_ij])``.
A global pool ``A = [a_1 .. a_K]`` of ``K`` cluster embeddings (learned) soft-assigns the task
to clusters with the Student's t-kernel (alpha degrees of freedom, as in DEC, Xie et al. 2016):

    c_ik = (1 + ||t_i - a_k||^2 / alpha)^(-(alpha+1)/2) / sum_k' (1 + ||t_i - a_k'||^2 / alpha)^(-(alpha+1)/2)

(:func:`student_t_assignment`), and the final task embedding adds what the task's clusters say
to what the task says of itself, ``o_i = t_i + sum_k c_ik a_k = t_i + c_i A``. The clustering
regulariser on ``c`` (a batch-level KL to a sharpened target) is in the algorithm.

**Adaptive decoder g_omega.** An MLP on ``[x_ij ; z_i]`` whose every hidden layer ``l`` is
modulated by the task embedding (``modulation``):

* ``film`` (FiLM, Perez et al. 2018): ``gamma^l = tanh(W_gamma^l o_i)``,
  ``beta^l = tanh(W_beta^l o_i)``, ``h^l = ReLU(gamma^l * (W^l h^(l-1) + b^l) + beta^l)``
  (:func:`film`);
* ``gating`` (the paper's Gating-FiLM): also ``eta^l = tanh(W_eta^l o_i)`` and a gate
  ``delta^l = sigmoid(W_delta^l o_i)`` mixing each FiLM parameter with ``eta``:
  ``gamma' = delta * gamma + (1 - delta) * eta``, ``beta' = delta * beta + (1 - delta) * eta``,
  ``h^l = ReLU(gamma' * (W^l h^(l-1) + b^l) + beta')`` (:func:`gated_film`);
* ``none``: an unmodulated MLP (the ablation without task-adaptive modulation).

A final linear layer gives the predicted rating (explicit) or logit (implicit).

**The fast parameters are the task state** ``task_z`` (``z_i``, ``z_dim``) and ``task_o``
(``o_i``, ``task_dim``): everything that depends on the task, and nothing else (all weights are
slow and shared). ``forward(features)`` scores (user, item) pairs with them; :meth:`TaNP.
task_start` computes them from a support set, which is where the framework starts every
task's adaptation (evaluation, the policies, :class:`metarec.Adapter`), so step 0 is TaNP's
amortised prediction, and gradient steps on ``(z, o)`` may follow (policy ``finetune`` with
``steps > 0``). They are stored as zeros, a neutral value no task is scored with: the start of
every task is computed. A task with an empty support set gets the encoders' value at the
empty aggregate (``r = t = 0``): ``z = mu(0)``, the prior of a task with nothing observed,
and ``o = 0 + c(0) A``.

Defaults: ``embedding_dim`` 32 per feature (MeLU's and RecBole-MetaRec's TaNP configuration);
the widths, latent sizes, ``K`` = 10 and ``alpha`` = 1 are those of the authors' released run
script (``train.sh`` of github.com/IIEdm/TaNP): encoder 32-16 then ``r`` 32, ``s`` 32, ``z``
32; task identity network 32-32 then ``t`` 16; decoder 32-32-16; dropout 0 (not implemented).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metarec import ENCODED, Backbone, DataSchema, PositiveFloat, PositiveInt
from metarec_plugins.backbones.feature_tables import embed_features, feature_tables

Modulation = Literal["film", "gating", "none"]
FeatureBatch = Mapping[str, torch.Tensor]


# -- the paper's operations, as pure functions ---------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean aggregator ``(1/n) sum_j r_j`` over the real rows (``mask``) of ``values``
    ``(..., N, d)``; the zero vector for an empty set."""
    weight = mask.to(values.dtype).unsqueeze(-1)
    return (values * weight).sum(-2) / weight.sum(-2).clamp_min(1.0)


def student_t_assignment(t: torch.Tensor, pool: torch.Tensor, alpha: float) -> torch.Tensor:
    """Soft assignment ``c_k`` of task identities ``t`` ``(..., d)`` to the clusters ``pool``
    ``(K, d)``: the Student's t-kernel ``(1 + ||t - a_k||^2 / alpha)^(-(alpha+1)/2)``,
    normalised over ``k`` (computed as a softmax of the log-kernels, which cannot underflow to
    0/0 far from every cluster)."""
    distance = (t.unsqueeze(-2) - pool).pow(2).sum(-1)  # (..., K)
    return torch.softmax(-(alpha + 1.0) / 2.0 * torch.log1p(distance / alpha), dim=-1)


def film(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """FiLM: ``gamma * h + beta`` (element-wise, broadcast over the rows of ``h``)."""
    return gamma * h + beta


def gated_film(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eta: torch.Tensor,
               delta: torch.Tensor) -> torch.Tensor:
    """Gating-FiLM: FiLM with ``gamma' = delta * gamma + (1 - delta) * eta`` and
    ``beta' = delta * beta + (1 - delta) * eta`` (``delta`` in (0, 1), a gate)."""
    return film(h, delta * gamma + (1 - delta) * eta, delta * beta + (1 - delta) * eta)


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers of ``widths`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ModulatedDecoder(nn.Module):
    """The decoder ``g_omega``: an MLP on ``[x ; z]`` whose hidden layers are modulated by the
    task embedding ``o`` (``film``, ``gating`` or ``none``), then a linear output.

    The modulation weights have no bias, as in the authors' code: ``gamma = tanh(W_gamma o)``.
    """

    def __init__(self, in_dim: int, task_dim: int, hidden: Sequence[int],
                 modulation: Modulation) -> None:
        super().__init__()
        if modulation not in ("film", "gating", "none"):
            raise ValueError(f"modulation must be 'film', 'gating' or 'none', got {modulation!r}")
        self.modulation = modulation
        widths = [in_dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        names = {"film": ("gamma", "beta"), "gating": ("gamma", "beta", "eta", "delta"),
                 "none": ()}[modulation]
        for name in names:  # one task-to-parameter map per hidden layer
            self.add_module(name, nn.ModuleList(nn.Linear(task_dim, h, bias=False)
                                                for h in hidden))
        self.output = nn.Linear(hidden[-1], 1)

    def forward(self, inputs: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Scores ``(...,)`` of ``inputs`` ``(..., in_dim)`` under the task embedding ``o``
        ``(task_dim,)`` (broadcast over the rows)."""
        h = inputs
        for index, layer in enumerate(self.layers):
            a = layer(h)
            if self.modulation != "none":
                gamma = torch.tanh(self.gamma[index](o))
                beta = torch.tanh(self.beta[index](o))
                if self.modulation == "gating":
                    eta = torch.tanh(self.eta[index](o))
                    delta = torch.sigmoid(self.delta[index](o))
                    a = gated_film(a, gamma, beta, eta, delta)
                else:
                    a = film(a, gamma, beta)
            h = F.relu(a)
        return self.output(h).squeeze(-1)


class TaNP(Backbone):
    """TaNP: feature embeddings, the latent encoder ``h_theta``, the task identity network
    ``m_phi`` with its global pool of ``K`` clusters, and the task-modulated decoder ``g_omega``
    (see the module docstring for the equations). Fast parameters: the task state
    ``task_z``/``task_o``, computed per task by :meth:`task_start`.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: width of every feature embedding (32: MeLU, RecBole-MetaRec).
        use_ids: also embed the user and item ids (slow); off as in the paper's features.
        encoder_hidden: hidden widths of ``h_theta`` (authors' script: 32, 16).
        r_dim: width of each ``r_ij`` and of their mean ``r_i`` (32).
        s_dim: width of ``s_i = ReLU(W_s r_i)`` before the mean and log-variance heads (32).
        z_dim: width of the latent variable ``z_i`` (32).
        identity_hidden: hidden widths of the task identity network ``m_phi`` (32, 32).
        task_dim: width of the task identity ``t_i``, the clusters ``a_k`` and ``o_i`` (16).
        clusters: ``K``, the number of cluster embeddings in the global pool (10).
        alpha: degrees of freedom of the Student's t-kernel (1.0).
        decoder_hidden: hidden widths of the decoder ``g_omega`` (32, 32, 16).
        modulation: ``film`` (default, the authors' code's active decoder), ``gating`` (the
            paper's Gating-FiLM) or ``none`` (no task-adaptive modulation).
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 32, use_ids: bool = False,
                 encoder_hidden: Sequence[PositiveInt] = (32, 16), r_dim: PositiveInt = 32,
                 s_dim: PositiveInt = 32, z_dim: PositiveInt = 32,
                 identity_hidden: Sequence[PositiveInt] = (32, 32), task_dim: PositiveInt = 16,
                 clusters: PositiveInt = 10, alpha: PositiveFloat = 1.0,
                 decoder_hidden: Sequence[PositiveInt] = (32, 32, 16),
                 modulation: Modulation = "film") -> None:
        super().__init__(schema)
        sizes = [embedding_dim, r_dim, s_dim, z_dim, task_dim, clusters]
        hidden = [*encoder_hidden, *identity_hidden, *decoder_hidden]
        if min(sizes) < 1 or (hidden and min(hidden) < 1) or not decoder_hidden:
            raise ValueError("every width and the number of clusters must be >= 1, and the "
                             "decoder needs at least one hidden layer")
        if not alpha > 0:
            raise ValueError(f"alpha (the Student's t degrees of freedom) must be > 0, got {alpha}")
        self.specs = list(schema.features)
        if not self.specs and not use_ids:
            raise ValueError("TaNP needs user/item features or use_ids=True")
        # Inputs x_ij: one embedding per feature (MeLU's), concatenated.
        self.embeddings = feature_tables(self.specs, embedding_dim)
        self.use_ids = use_ids
        if use_ids:
            self.user_embedding = nn.Embedding(schema.num_users, embedding_dim)
            self.item_embedding = nn.Embedding(schema.num_items, embedding_dim)
        x_dim = embedding_dim * (len(self.specs) + 2 * int(use_ids))
        # Encoder h_theta and the latent heads.
        self.encoder = _mlp([x_dim + 1, *encoder_hidden, r_dim])
        self.latent_hidden = nn.Linear(r_dim, s_dim)
        self.latent_mean = nn.Linear(s_dim, z_dim)
        self.latent_logvar = nn.Linear(s_dim, z_dim)
        # Customisation module: task identity network m_phi and the global pool A.
        self.identity = _mlp([x_dim + 1, *identity_hidden, task_dim])
        self.pool = nn.Parameter(nn.init.xavier_uniform_(torch.empty(clusters, task_dim)))
        self.alpha = float(alpha)
        # Decoder g_omega.
        self.decoder = ModulatedDecoder(x_dim + z_dim, task_dim, decoder_hidden, modulation)
        if schema.feedback == "explicit" and schema.rating_range is not None:
            nn.init.constant_(self.decoder.output.bias, sum(schema.rating_range) / 2)
        # The fast task state (z_i, o_i): stored neutral, computed per task by task_start.
        self.task_z = nn.Parameter(torch.zeros(z_dim))
        self.task_o = nn.Parameter(torch.zeros(task_dim))

    # -- inputs ---------------------------------------------------------------------------------
    def embed(self, features: FeatureBatch) -> torch.Tensor:
        """``x`` ``(..., x_dim)``: the concatenated user and item embeddings (slow parameters;
        a batch's precomputed ``features[ENCODED]`` when present)."""
        if ENCODED in features:
            return features[ENCODED]
        parts = embed_features(self.embeddings, self.specs, features)
        if self.use_ids:
            parts += [self.user_embedding(features["user_id"]),
                      self.item_embedding(features["item_id"])]
        return torch.cat(parts, dim=-1)

    def pairs(self, interactions: FeatureBatch) -> torch.Tensor:
        """``[x_ij ; y~_ij]`` ``(..., x_dim + 1)`` of labelled interactions, the label rescaled
        to [-1, 1] over the rating range (explicit feedback) or left 0/1 (implicit)."""
        x = self.embed(interactions)
        y = interactions["label"].to(x.dtype)
        if self.schema.feedback == "explicit" and self.schema.rating_range is not None:
            low, high = self.schema.rating_range
            y = (y - (low + high) / 2) / max((high - low) / 2, 1e-12)
        return torch.cat([x, y.unsqueeze(-1)], dim=-1)

    # -- the encoders ---------------------------------------------------------------------------
    def latent(self, interactions: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | C)`` of one set ``C`` of interactions (its real rows: ``mask``): the mean and
        the log-variance ``(z_dim,)`` from ``r = mean_j h_theta([x_j ; y_j])``."""
        r = masked_mean(self.encoder(self.pairs(interactions)), interactions["mask"])
        s = F.relu(self.latent_hidden(r))
        return self.latent_mean(s), self.latent_logvar(s)

    def customise(self, interactions: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The customisation module on one set of interactions: the soft cluster assignment
        ``c`` ``(K,)`` of ``t = mean_j m_phi([x_j ; y_j])`` and the task embedding
        ``o = t + c A`` ``(task_dim,)``."""
        t = masked_mean(self.identity(self.pairs(interactions)), interactions["mask"])
        c = student_t_assignment(t, self.pool, self.alpha)
        return c, t + c @ self.pool

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``z = mean + exp(logvar / 2) * eps`` while training (reparameterised); the mean in
        eval mode (deterministic evaluation)."""
        if not self.training:
            return mean
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def task_start(self, support: FeatureBatch) -> dict[str, torch.Tensor]:
        """One task's state from its support set: ``z ~ q(z | S)`` (its mean in eval mode) and
        the task embedding ``o`` of the customisation module. What the framework starts every
        task's adaptation from (:meth:`metarec.MetaAlgorithm.task_start`)."""
        mean, logvar = self.latent(support)
        _, o = self.customise(support)
        return {"task_z": self.sample(mean, logvar), "task_o": o}

    def np_terms(self, context: FeatureBatch, target: FeatureBatch) -> dict[str, torch.Tensor]:
        """What the training objective needs of one task: the prior ``q(z | context)`` and the
        posterior ``q(z | target)`` (means and log-variances), the soft assignment of the
        context and the task state to score with: ``z`` drawn from the posterior and ``o``
        from the context (the support set: only it is seen at test time)."""
        prior_mean, prior_logvar = self.latent(context)
        post_mean, post_logvar = self.latent(target)
        assignment, o = self.customise(context)
        return {"prior_mean": prior_mean, "prior_logvar": prior_logvar,
                "posterior_mean": post_mean, "posterior_logvar": post_logvar,
                "assignment": assignment, "task_z": self.sample(post_mean, post_logvar),
                "task_o": o}

    # -- scoring --------------------------------------------------------------------------------
    def forward(self, features: FeatureBatch, encode_only: bool = False) -> torch.Tensor:
        """Scores ``(...,)`` of (user, item) pairs under the task state ``task_z``/``task_o``:
        ``g_omega([x ; z], o)``."""
        x = self.embed(features)
        if encode_only:
            return x
        z = self.task_z.expand(*x.shape[:-1], self.task_z.shape[-1])
        return self.decoder(torch.cat([x, z], dim=-1), self.task_o)

    def default_fast_parameters(self) -> list[str]:
        return ["task_z", "task_o"]

    def head_parameters(self) -> list[str]:
        return ["decoder.output.*"]

    def encoder_parameters(self) -> list[str]:
        return ["embeddings.*", "user_embedding.*", "item_embedding.*"]
