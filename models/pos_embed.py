"""Fixed N-D sine-cosine position embedding laid out exactly as CineMA builds it."""

from __future__ import annotations

import math

import torch


def sincos_pos_embed(embed_dim: int, grid_size: tuple[int, ...], max_period: float = 10000.0) -> torch.Tensor:
    """Return the (1, n_patches, embed_dim) float32 embedding of the patch tokens (no CLS entry).

    Each grid axis gets an even share `d` of the channels (sin half, then cos half, frequencies
    max_period^(-i / (d/2))); leftover channels are zero. As in CineMA, the coordinates come from a
    numpy-style `meshgrid(..., indexing="xy")`, so rows are ordered with the first two axes swapped
    relative to the (x, y, z) token order.
    """
    n_axes = len(grid_size)
    axis_dim = embed_dim // n_axes
    axis_dim -= axis_dim % 2
    if axis_dim == 0:
        raise ValueError(f"embed_dim {embed_dim} is too small for a {n_axes}-D sin-cos embedding")
    half = axis_dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    coords = torch.meshgrid(*(torch.arange(size, dtype=torch.float64) for size in grid_size), indexing="xy")
    n_patches = math.prod(grid_size)
    parts = []
    for axis_coords in coords:
        angles = axis_coords.reshape(-1, 1) * freqs.reshape(1, -1)
        parts += [angles.sin(), angles.cos()]
    parts.append(torch.zeros(n_patches, embed_dim - axis_dim * n_axes, dtype=torch.float64))
    return torch.cat(parts, dim=1).to(torch.float32).unsqueeze(0)
