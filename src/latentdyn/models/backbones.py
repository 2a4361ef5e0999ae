"""Causal context encoders: a window of standardised latents ``(B, W, D)`` -> a summary vector ``(B, H)``.

Every backbone exposes ``out_features`` (H) so a head can be built on top of it.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPBackbone(nn.Module):
    """MLP over the flattened window (W x D): the simplest context model, strong for short windows."""

    def __init__(
        self,
        dim: int,
        context: int,
        hidden: int = 512,
        layers: int = 3,
        dropout: float = 0.0,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"MLPBackbone needs at least one layer, got {layers}")
        blocks: list[nn.Module] = []
        width = dim * context
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU()]
            blocks += [nn.LayerNorm(hidden)] if layer_norm else []
            blocks += [nn.Dropout(dropout)] if dropout > 0 else []
            width = hidden
        self.net = nn.Sequential(*blocks)
        self.out_features = hidden

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.net(context.flatten(1))


class GRUBackbone(nn.Module):
    """GRU over the window; the last hidden state summarises it."""

    def __init__(
        self, dim: int, context: int, hidden: int = 512, layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.gru = nn.GRU(
            dim, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0
        )
        self.norm = nn.LayerNorm(hidden)
        self.out_features = hidden

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(context)
        return self.norm(out[:, -1])


class CausalTransformerBackbone(nn.Module):
    """Small causal (masked) Transformer over the window; the last position summarises it."""

    def __init__(
        self,
        dim: int,
        context: int,
        d_model: int = 256,
        n_heads: int = 4,
        layers: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input = nn.Linear(dim, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
        )
        self.out_features = d_model

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        w = context.shape[1]
        h = self.input(context) + self.position[-w:]
        h = self.encoder(h, mask=self.mask[:w, :w].to(h.dtype), is_causal=True)
        return self.norm(h[:, -1])
