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
        # Column selectors: matmuls with these replace slicing the rows into factors and bias. A slice's
        # backward allocates and zero-fills a full (batch, dim+1) gradient per slice, which profiling
        # showed was the largest single cost of a CPU step; a matmul's backward is one small outer product.
        select = torch.zeros(dim + 1)
        select[dim] = 1.0
        self.register_buffer("bias_col", select, persistent=False)
        self.register_buffer("factor_cols", 1.0 - select, persistent=False)
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
        """Predictions and the gathered rows ``(u, v)`` = ([p_u, b_u], [q_i, b_i]) for the regularizers."""
        u = self.users(user)
        v = self.items(item)
        uv = u * v
        if dropout_mask is not None:  # dropout on the factor interactions, scaled by 1/(1-p) in the mask
            uv = uv * dropout_mask
        pred = self.global_bias + uv @ self.factor_cols + (u + v) @ self.bias_col
        return pred, (u, v)

    @torch.no_grad()
    def predict(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.forward(user, item)[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """User factors, user biases, item factors, item biases (views of the tables)."""
        d = self.dim
        return self.users.weight[:, :d], self.users.weight[:, d], self.items.weight[:, :d], self.items.weight[:, d]
