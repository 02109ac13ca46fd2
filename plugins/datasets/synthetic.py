"""A synthetic rating data set with a known generating process: the embedded default.

Items have categorical and multi-hot features that fully determine their latent factors.
Users belong to latent taste clusters; a user's taste is the cluster centre plus individual
variation (``heterogeneity``). User features reveal the cluster only weakly
(``feature_informativeness``), so a model must learn a user's taste from that user's own
ratings: exactly the situation in which a meta-learned initialisation that adapts quickly
beats one trained for the average user. Ratings are ``3 + scale * <u, v> + bias + noise``,
rounded and clipped to 1-5 stars. Everything is seeded.
"""

from __future__ import annotations

import numpy as np

from metarec import (
    ClosedUnitInterval,
    Dataset,
    Feature,
    FeatureSpec,
    InteractionTable,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
)

# Above this many (user, item) cells, distinct items are not drawn with one argsort of a
# random key per cell (which needs num_users x num_items memory); see _distinct_items.
_DENSE_DRAW_CELLS = 20_000_000


def _distinct_items(rng: np.random.Generator, counts: np.ndarray, num_items: int) -> np.ndarray:
    """``counts[u]`` distinct random items for every user ``u``, concatenated user by user.

    Small problems: the first ``counts[u]`` entries of a random permutation per user (one
    ``num_users x num_items`` argsort). Large catalogues that users rate sparsely (e.g. a
    million items): draw with replacement, then redraw only the entries that repeat an item of
    the same user, until none do; memory is O(interactions) and a few rounds suffice. Large
    problems where users rate a sizeable share of the catalogue (where redrawing would take
    many rounds): the permutation draw, a block of users at a time.
    """
    n_u = len(counts)

    def permutation_draw(block: np.ndarray) -> np.ndarray:
        keys = rng.random((len(block), num_items)).argsort(axis=1)
        return keys[np.arange(num_items)[None, :] < block[:, None]]

    if n_u * num_items <= _DENSE_DRAW_CELLS:
        return permutation_draw(counts)
    if counts.max(initial=0) > 0.1 * num_items:
        size = max(1, _DENSE_DRAW_CELLS // num_items)
        return np.concatenate([permutation_draw(counts[lo:lo + size])
                               for lo in range(0, n_u, size)])
    users = np.repeat(np.arange(n_u, dtype=np.int64), counts)
    items = rng.integers(0, num_items, len(users))
    while True:
        order = np.lexsort((items, users))
        pair = users[order] * num_items + items[order]
        repeat = np.zeros(len(users), dtype=bool)
        repeat[order[1:]] = pair[1:] == pair[:-1]
        if not repeat.any():
            return items
        items[repeat] = rng.integers(0, num_items, int(repeat.sum()))


class SyntheticDataset(Dataset):
    """Seeded synthetic ratings from taste clusters (see module docstring).

    Args:
        num_users, num_items: sizes.
        num_clusters: latent taste clusters of users.
        latent_dim: dimension of the latent factors.
        heterogeneity: spread of users around their cluster centre (0 = identical users).
        noise: standard deviation of rating noise, in stars.
        min_interactions, max_interactions: range of interactions per user (uniform).
        feature_informativeness: probability that a user's ``segment`` feature equals the
            cluster (otherwise it is random).
        seed: random seed.
    """

    def __init__(self, num_users: PositiveInt = 1000, num_items: PositiveInt = 400,
                 num_clusters: PositiveInt = 4, latent_dim: PositiveInt = 8,
                 heterogeneity: NonNegativeFloat = 0.3, noise: NonNegativeFloat = 0.3,
                 min_interactions: PositiveInt = 15, max_interactions: PositiveInt = 60,
                 feature_informativeness: ClosedUnitInterval = 0.25,
                 seed: NonNegativeInt = 0) -> None:
        if min(num_users, num_items, num_clusters, latent_dim) < 1:
            raise ValueError("num_users, num_items, num_clusters and latent_dim must be >= 1")
        if not 1 <= min_interactions <= max_interactions <= num_items:
            raise ValueError("need 1 <= min_interactions <= max_interactions <= num_items")
        if heterogeneity < 0 or noise < 0 or not 0 <= feature_informativeness <= 1:
            raise ValueError("heterogeneity and noise must be >= 0; feature_informativeness in [0, 1]")
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})

    def load(self) -> InteractionTable:
        rng = np.random.default_rng(self.seed)
        d, n_u, n_i = self.latent_dim, self.num_users, self.num_items
        # Items: features -> latent factors and a bias.
        n_cat, n_style, n_tags = 12, 6, 10
        category = rng.integers(0, n_cat, n_i)
        style = rng.integers(0, n_style, n_i)
        tags = (rng.random((n_i, n_tags)) < 0.2).astype(np.float32)
        tags[np.arange(n_i), rng.integers(0, n_tags, n_i)] = 1.0
        e_cat, e_style, e_tag = (rng.normal(0, 1, (n, d)) for n in (n_cat, n_style, n_tags))
        v = e_cat[category] + 0.5 * e_style[style] + 0.5 * (tags @ e_tag) / tags.sum(1, keepdims=True)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        item_bias = rng.normal(0, 0.3, n_cat)[category]
        # Users: clusters of taste; weakly informative features.
        centres = rng.normal(0, 1, (self.num_clusters, d))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        cluster = rng.integers(0, self.num_clusters, n_u)
        u = centres[cluster] + self.heterogeneity * rng.normal(0, 1, (n_u, d)) / np.sqrt(d)
        reveal = rng.random(n_u) < self.feature_informativeness
        segment = np.where(reveal, cluster, rng.integers(0, self.num_clusters, n_u))
        region = rng.integers(0, 8, n_u)
        # Interactions: each user rates a random subset of items over time.
        counts = rng.integers(self.min_interactions, self.max_interactions + 1, n_u)
        users = np.repeat(np.arange(n_u), counts)
        items = _distinct_items(rng, counts, n_i)
        score = 3.0 + 1.5 * np.einsum("nd,nd->n", u[users], v[items]) + item_bias[items]
        ratings = np.clip(np.rint(score + rng.normal(0, self.noise, len(users))), 1, 5)
        timestamps = 1_000_000 + np.cumsum(rng.integers(1, 100, len(users)))
        return InteractionTable(
            users=users, items=items, labels=ratings, timestamps=timestamps,
            num_users=n_u, num_items=n_i,
            user_features=[
                Feature(FeatureSpec("segment", "user", "categorical", self.num_clusters), segment),
                Feature(FeatureSpec("region", "user", "categorical", 8), region),
            ],
            item_features=[
                Feature(FeatureSpec("category", "item", "categorical", n_cat), category),
                Feature(FeatureSpec("style", "item", "categorical", n_style), style),
                Feature(FeatureSpec("tags", "item", "multihot", n_tags), tags),
            ],
            feedback="explicit", rating_range=(1.0, 5.0), source="synthetic",
        )
