"""PatchCore (Roth et al., 2022): a coreset memory bank of locally aware patch features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tiled_hydra.errors import ConfigError
from tiled_hydra.core.filters import gaussian_blur, upsample
from tiled_hydra.models.patchcore.knn import build_index, search
from tiled_hydra.models.patchcore.coreset import coreset_size, greedy_coreset


class PatchcoreModel(nn.Module):
    """Patch embedding, memory-bank fitting, and the nearest-neighbour anomaly map and score."""

    def __init__(self, pool_size: int, coreset_ratio: float, projection_dim: int, num_neighbors: int, blur_sigma: float):
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ConfigError(f"patchcore pool_size must be odd and positive, got {pool_size}")
        if not 0 < coreset_ratio <= 1:
            raise ConfigError(f"patchcore coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if num_neighbors < 1:
            raise ConfigError(f"patchcore num_neighbors must be >= 1, got {num_neighbors}")
        self.pool_size = pool_size
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self.register_buffer("memory_bank", torch.empty(0))  # (M, D); resized on load

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Locally aware patch features (B, D, h, w) on the grid of the first (finest) stage.

        Each stage is averaged over a pool_size x pool_size neighbourhood (stride 1), so a
        patch also sees its surroundings; coarser stages are upsampled and concatenated.
        """
        pad = self.pool_size // 2
        pooled = [F.avg_pool2d(f, self.pool_size, stride=1, padding=pad, count_include_pad=False) for f in features]
        size = pooled[0].shape[-2:]
        resized = [p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pooled]
        return torch.cat(resized, dim=1)

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """embeddings (N, D, h, w) -> memory bank of a greedy k-center coreset of all patches."""
        patches = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
        selected = greedy_coreset(patches, coreset_size(len(patches), self.coreset_ratio), self.projection_dim)
        self.memory_bank = patches[selected].float().contiguous()

    def forward(self, embedding: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (B, D, h, w) -> anomaly map (B, H, W) and reweighted image score (B,)."""
        if self.memory_bank.numel() == 0:
            raise RuntimeError("patchcore memory bank is empty: fit the model (or load a slot) first")
        b, d, h, w = embedding.shape
        patches = embedding.permute(0, 2, 3, 1).reshape(-1, d)
        index = build_index(self.memory_bank)
        distances, nearest = search(index, patches, 1)
        patch_scores = distances.view(b, h * w)
        nearest = nearest.view(b, h * w)
        scores = self.image_scores(index, patches.view(b, h * w, d), patch_scores, nearest)
        maps = upsample(patch_scores.view(b, h, w), output_size, mode="nearest")
        return gaussian_blur(maps, self.blur_sigma), scores

    def image_scores(self, index, patches: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """PatchCore's image score: the largest patch distance s*, damped when its memory item is in a dense region.

        With m* the memory item nearest to the worst patch and N(m*) its k nearest memory items
        (m* itself included), s = (1 - exp(|p - m*|) / sum_{m in N(m*)} exp(|p - m|)) * s*.
        """
        worst = patch_scores.argmax(dim=1)  # (B,)
        rows = torch.arange(len(worst), device=worst.device)
        top_score = patch_scores[rows, worst]
        top_patch = patches[rows, worst]  # (B, D)
        top_item = self.memory_bank[nearest[rows, worst]]  # (B, D)
        k = min(self.num_neighbors, len(self.memory_bank))
        _, support = search(index, top_item, k)  # (B, k), m* itself first
        distances = torch.linalg.vector_norm(self.memory_bank[support] - top_patch.unsqueeze(1), dim=-1)  # (B, k)
        # the exp(s*) / sum exp(.) ratio in log space: no overflow for large distances
        weight = 1 - torch.exp(top_score - torch.logsumexp(distances, dim=1))
        return weight * top_score
