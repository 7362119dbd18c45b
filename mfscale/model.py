"""Biased matrix factorization: ``rating ~ mean + b_user + b_item + <p_user, q_item>``.

Each side is one sparse ``nn.Embedding`` of width ``dim + 1``: the factors and, in the last column, the
bias. A user's factors and bias are always touched together, so one table per side halves the sparse
gradients to synchronize and the optimizer's per-table work. Only the global bias is a dense parameter
(it goes through DDP). Biases start at zero and factors near zero, so a user or movie never seen in
training predicts the global mean plus whatever bias is known.
"""

from __future__ import annotations

import torch
from torch import nn

SPARSE_TABLES = ("users.weight", "items.weight")


class BiasedMF(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, *, mean: float = 3.5, init_std: float = 0.01):
        super().__init__()
        self.dim = dim
        self.users = nn.Embedding(n_users, dim + 1, sparse=True)
        self.items = nn.Embedding(n_items, dim + 1, sparse=True)
        self.global_bias = nn.Parameter(torch.tensor(float(mean)))
        with torch.no_grad():
            for table in (self.users, self.items):
                table.weight.normal_(0.0, init_std)
                table.weight[:, dim] = 0.0

    @property
    def shape(self) -> dict[str, int]:
        return {"n_users": self.users.num_embeddings, "n_items": self.items.num_embeddings, "dim": self.dim}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.users.weight, self.items.weight]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [self.global_bias]

    def forward(self, user: torch.Tensor, item: torch.Tensor, dropout_mask: torch.Tensor | None = None):
        """Predictions and the gathered rows (needed by the regularizers, so they are gathered once)."""
        u = self.users(user)
        v = self.items(item)
        p, bu = u[:, : self.dim], u[:, self.dim]
        q, bi = v[:, : self.dim], v[:, self.dim]
        pq = p * q
        if dropout_mask is not None:  # dropout on the factor interactions, scaled by 1/(1-p) in the mask
            pq = pq * dropout_mask
        pred = self.global_bias + bu + bi + pq.sum(dim=1)
        return pred, (p, q, bu, bi)

    @torch.no_grad()
    def predict(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.forward(user, item)[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """User factors, user biases, item factors, item biases (views of the tables)."""
        d = self.dim
        return self.users.weight[:, :d], self.users.weight[:, d], self.items.weight[:, :d], self.items.weight[:, d]
