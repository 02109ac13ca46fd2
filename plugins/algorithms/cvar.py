"""CVAR (Zhao, Ren, Du, Zhang and Wang, SIGIR 2022: "Improving Item Cold-start Recommendation
via Model-agnostic Conditional Variational Autoencoder").

A conditional VAE over the pretrained item id embeddings, conditioned on the items' side
information, generates a new item's id embedding from its side information alone. For a training
(old) item with trained id embedding ``e_i`` and side information ``c_i`` (its features,
embedded):

    (mu, log s^2)     = Enc([e_i, c_i])         posterior q(z | e_i, c_i)
    (mu_p, log s_p^2) = Prior(c_i)              prior p(z | c_i): side information only
    z   = mu + s * eps,   z_p = mu_p + s_p * eps'          (reparameterised)
    e^  = e_0 + Dec([z, c_i]),   e^_p = e_0 + Dec([z_p, c_i])
    L   = L_rec(e^_p) + recon_weight * ||e^ - e_i||^2 + beta * KL(q || p)

with ``L_rec`` the frozen backbone's loss of the item's ratings (its support and query) scored
with the generated embedding ``e^_p``, and ``e_0`` the backbone's new-item start (mf's
``item_default``). The backbone is frozen; encoder, prior, decoder and their feature
embeddings learn. The recommendation loss trains the side-information path (prior + decoder)
that a cold item uses; the reconstruction and the KL term tie that path to the distribution of
trained embeddings.

In metarec the item's id embedding is the backbone's fast parameters plus, with mf's
``use_item_table``, the old item's own pretrained row (:mod:`.item_embedding`). A new item has
no trained embedding, so the task-conditioned start (:meth:`task_start`) is the prior path,
``e^_p`` at ``z_p = mu_p`` (no sampling outside training): evaluation's cold stage scores it and
the warm-up stages fine-tune it on the item's first ratings with this algorithm's inner loop
(``inner_steps`` of ``inner_lr``), as the authors' evaluation does.

Departures: the regulariser is the KL divergence of the CVAE (the authors' code uses a
2-Wasserstein distance between the two Gaussians, ``divergence: wasserstein``, and samples with
the noise scaled by 1e-4); the decoder's condition is the side information (the authors' code
conditions on the item's interaction count, which a cold item does not have); the decoder
output is added to the backbone's new-item start and zero-initialised, so training starts from
the pretrained cold start. The authors also re-train CVAR on each warm-up stage's data;
metarec's evaluation never changes the model, so here the warm-up stages only fine-tune the
generated embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from torch.func import vmap

from metarec import (
    EpisodeBatch,
    FeatureBatch,
    FunctionalModel,
    MetaAlgorithm,
    NonNegativeFloat,
    NonNegativeInt,
    Params,
    PositiveFloat,
    PositiveInt,
)
from metarec_plugins.algorithms.item_embedding import (
    ItemFeatures,
    ItemIdEmbedding,
    freeze,
    require_item_tasks,
)
from metarec_plugins.backbones.twotower import mlp


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, mu_p: torch.Tensor,
                logvar_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag e^logvar) || N(mu_p, diag e^logvar_p))``, summed over the dims."""
    return 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p) ** 2) / logvar_p.exp()
                  - 1.0).sum(-1)


def gaussian_w2(mu: torch.Tensor, logvar: torch.Tensor, mu_p: torch.Tensor,
                logvar_p: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance of two diagonal Gaussians, summed over the dims."""
    return ((mu - mu_p) ** 2 + ((0.5 * logvar).exp() - (0.5 * logvar_p).exp()) ** 2).sum(-1)


class CVAR(MetaAlgorithm):
    """CVAR: a conditional VAE generating new items' id embeddings on a frozen backbone.

    Args:
        inner_steps: warm-up fine-tuning steps of the generated embedding at evaluation.
        inner_lr: their step size.
        latent_dim: width of ``z`` (the authors' code: 16).
        embedding_dim: width of the side information's feature embeddings.
        hidden: hidden widths of encoder, prior and decoder (the authors' code: none, linear).
        recon_weight: weight of the reconstruction term (the authors' code: 1).
        beta: weight of the divergence term (the authors' code: 1e-4).
        divergence: ``kl`` (the CVAE's) or ``wasserstein`` (the authors' code).
        id_tables: fast parameter -> the backbone's per-item table (default: mf's).
        freeze_backbone: keep every backbone parameter fixed (the paper); off trains both.
        fast_parameters: patterns overriding the backbone's fast parameters (the id embedding).
    """

    def __init__(self, inner_steps: NonNegativeInt = 1, inner_lr: PositiveFloat = 0.1,
                 latent_dim: PositiveInt = 16, embedding_dim: PositiveInt = 8,
                 hidden: Sequence[PositiveInt] = (), recon_weight: NonNegativeFloat = 1.0,
                 beta: NonNegativeFloat = 1e-4,
                 divergence: Literal["kl", "wasserstein"] = "kl",
                 id_tables: Mapping[str, str] | None = None, freeze_backbone: bool = True,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        if recon_weight < 0 or beta < 0:
            raise ValueError(f"recon_weight and beta must be >= 0, got {recon_weight}, {beta}")
        if divergence not in ("kl", "wasserstein"):
            raise ValueError(f"divergence must be kl or wasserstein, got {divergence!r}")
        self.latent_dim, self.embedding_dim = int(latent_dim), int(embedding_dim)
        self.hidden = [int(h) for h in hidden]
        self.recon_weight, self.beta, self.divergence = float(recon_weight), float(beta), divergence
        self.id_tables, self.freeze_backbone = id_tables, bool(freeze_backbone)

    def bind(self, model: FunctionalModel) -> None:
        require_item_tasks(model, "cvar")
        self.ids = ItemIdEmbedding(model, self.id_tables)
        self.features = ItemFeatures(model.backbone.schema.of("item"), self.embedding_dim, "cvar")
        size, c, k = self.ids.size, self.features.width, self.latent_dim
        self.encoder_body, width = mlp(size + c, self.hidden)
        self.encoder_out = nn.Linear(width, 2 * k)
        self.prior_body, width = mlp(c, self.hidden)
        self.prior_out = nn.Linear(width, 2 * k)
        self.decoder_body, width = mlp(k + c, self.hidden)
        self.decoder_out = nn.Linear(width, size)
        nn.init.zeros_(self.decoder_out.weight)
        nn.init.zeros_(self.decoder_out.bias)
        if self.freeze_backbone:
            freeze(model.backbone)

    def posterior(self, e: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of ``q(z | e_i, c_i)``."""
        return self.encoder_out(self.encoder_body(torch.cat([e, c], -1))).chunk(2, -1)

    def prior(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu_p, logvar_p)`` of ``p(z | c_i)``: side information only."""
        return self.prior_out(self.prior_body(c)).chunk(2, -1)

    def decode(self, fast: Params, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``e_0 + Dec([z, c_i])``: a generated id embedding (flat)."""
        return self.ids.flatten(fast) + self.decoder_out(self.decoder_body(torch.cat([z, c], -1)))

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``mu + s * eps`` in training, ``mu`` otherwise (deterministic evaluation)."""
        if not self.training:
            return mu
        return mu + (0.5 * logvar).exp() * torch.randn_like(mu)

    def task_start(self, model: FunctionalModel, fast: Params, slow: Params,
                   support: FeatureBatch) -> Params:
        """The generated id embedding ``e^_p`` of the task's item from its side information."""
        c = self.features(support)
        mu_p, logvar_p = self.prior(c)
        return self.ids.write(fast, slow, support, self.decode(fast, self.sample(mu_p, logvar_p), c))

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()
        distance = gaussian_kl if self.divergence == "kl" else gaussian_w2

        def task_losses(support, query):
            e, c = self.ids.read(fast, slow, support), self.features(support)
            mu, logvar = self.posterior(e, c)
            mu_p, logvar_p = self.prior(c)
            recon = ((self.decode(fast, self.sample(mu, logvar), c) - e) ** 2).sum()
            generated = self.ids.write(fast, slow, support,
                                       self.decode(fast, self.sample(mu_p, logvar_p), c))
            # The recommendation loss over all the item's ratings (support and query).
            n_s, n_q = support["mask"].sum(), query["mask"].sum()
            rec = ((model.loss(generated, slow, support) * n_s
                    + model.loss(generated, slow, query) * n_q) / (n_s + n_q).clamp_min(1))
            return torch.stack([rec, recon, distance(mu, logvar, mu_p, logvar_p)])

        rec, recon, div = vmap(task_losses, randomness="different")(batch.support,
                                                                    batch.query).mean(0)
        loss = rec + self.recon_weight * recon + self.beta * div
        return loss, {"rec_loss": rec.detach(), "recon_loss": recon.detach(),
                      f"{self.divergence}": div.detach()}
