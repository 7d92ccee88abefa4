"""Exact k-nearest-neighbour search in a memory bank with faiss (GPU index when available)."""

from __future__ import annotations

import faiss
import numpy as np
import torch

_gpu_resources = None  # one faiss GPU context per process: creating it reserves scratch memory


def _gpu_index(dim: int, device: torch.device):
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = device.index if device.index is not None else torch.cuda.current_device()
    return faiss.GpuIndexFlatL2(_gpu_resources, dim, config)


def build_index(bank: torch.Tensor):
    """Flat (exact) L2 index over ``bank`` (M, D); on the GPU when faiss has GPU support and bank is on CUDA."""
    dim = bank.shape[1]
    if bank.is_cuda and hasattr(faiss, "StandardGpuResources"):
        index = _gpu_index(dim, bank.device)
    else:
        index = faiss.IndexFlatL2(dim)
    index.add(_as_numpy(bank))
    return index


def search(index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank items of each query (Q, D): Euclidean distances (Q, k) and indices (Q, k), on the queries' device."""
    squared, indices = index.search(_as_numpy(queries), k)
    distances = torch.from_numpy(squared).clamp_min_(0).sqrt_()  # faiss returns squared L2
    return distances.to(queries.device), torch.from_numpy(indices).to(queries.device)


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())
