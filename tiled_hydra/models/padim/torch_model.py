"""PaDiM: one multivariate Gaussian per patch position of the feature grid (Defard et al., 2021)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from tiled_hydra.errors import ConfigError
from tiled_hydra.core.filters import gaussian_blur, upsample


def concat_stages(features: list[torch.Tensor]) -> torch.Tensor:
    """Upsample every stage to the finest grid (nearest, as in PaDiM) and stack channels."""
    size = features[0].shape[-2:]
    return torch.cat([features[0]] + [F.interpolate(f, size=size, mode="nearest") for f in features[1:]], dim=1)


# The whitening matrix W (lower-triangular, D x D per patch) is held as row blocks: block i is
# W[rows b_i..b_{i+1}, columns 0..b_{i+1}] (transposed, contiguous), so the zeros above the diagonal
# are mostly not stored or read. Three blocks keep 2/3 of the D x D floats and score a patch 2x
# faster than the full matrix (a batch of matrix-vector products is memory-bound).
ROW_BLOCKS = 3


def row_block_bounds(d: int) -> list[int]:
    """Row boundaries b_0 = 0 < ... <= b_k = D of the whitening's row blocks."""
    return [round(d * i / ROW_BLOCKS) for i in range(ROW_BLOCKS + 1)]


def block_tril_indices(d: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row block, the (column, row - b_i) positions of its lower-triangle entries, in the
    row-major order of ``torch.tril_indices``; concatenated over blocks they enumerate the triangle."""
    bounds, (rows, cols) = row_block_bounds(d), torch.tril_indices(d, d)
    return [(cols[(rows >= lo) & (rows < hi)], rows[(rows >= lo) & (rows < hi)] - lo) for lo, hi in zip(bounds, bounds[1:])]


def join_row_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Row blocks -> the full lower-triangular (..., D, D) matrix."""
    d = blocks[-1].shape[-2]
    out = blocks[-1].new_zeros(*blocks[-1].shape[:-2], d, d)
    for (lo, hi), block in zip(zip(row_block_bounds(d), row_block_bounds(d)[1:]), blocks):
        out[..., lo:hi, :hi] = block.transpose(-1, -2)
    return out


def run_chunks(work: Callable[[int], None], starts: range, device: torch.device) -> None:
    """``work(start)`` for every chunk start; on a CPU on ``torch.get_num_threads()`` threads, since
    batched linear algebra on small matrices runs on one core. Chunks write disjoint outputs."""
    if device.type == "cpu" and torch.get_num_threads() > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(torch.get_num_threads(), len(starts))) as pool:
            list(pool.map(work, starts))  # list(): re-raises a chunk's error here
    else:
        for start in starts:
            work(start)


class PadimModel(nn.Module):
    """Per-patch Gaussian statistics and the Mahalanobis anomaly map."""

    def __init__(self, total_channels: int, n_features: int, epsilon: float, blur_sigma: float):
        super().__init__()
        if not 1 <= n_features <= total_channels:  # a negative count would slice all but |n| channels
            raise ConfigError(f"model.net.n_features={n_features}: expected an integer in [1, {total_channels}] "
                              "(the backbone's channels at model.net.layers)")
        self.epsilon = epsilon
        self.blur_sigma = blur_sigma
        # Random channel subset, drawn from the (seeded) global RNG and kept in the checkpoint.
        self.register_buffer("channel_index", torch.randperm(total_channels)[:n_features].sort().values)
        self.register_buffer("mean", torch.empty(0))  # (P, D)
        # W = inverse Cholesky factor of the covariance, as row blocks whitening_0.. (see ROW_BLOCKS)
        for i in range(ROW_BLOCKS):
            self.register_buffer(f"whitening_{i}", torch.empty(0))

    @property
    def whitening_blocks(self) -> list[torch.Tensor]:
        return [getattr(self, f"whitening_{i}") for i in range(ROW_BLOCKS)]

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Backbone stages -> embedding (B, D, h, w) of the selected channels.

        Equal to ``concat_stages(features).index_select(1, channel_index)``, but each stage's own
        selected channels are picked before upsampling: the unselected ones are never upsampled
        (at 32 tiles of 256 px the full concatenation alone was ~90 MB per batch).
        """
        b, (h, w) = features[0].shape[0], features[0].shape[-2:]
        out = features[0].new_empty(b, len(self.channel_index), h, w)  # one allocation, filled stage by stage
        filled, offset = 0, 0
        for stage in features:
            channels = stage.shape[1]
            own = self.channel_index[(self.channel_index >= offset) & (self.channel_index < offset + channels)] - offset
            picked, target = stage.index_select(1, own), out[:, filled : filled + len(own)]
            sh, sw = stage.shape[-2:]
            if (sh, sw) == (h, w):
                target.copy_(picked)
            elif h % sh == 0 and w % sw == 0:  # nearest upsampling by whole factors: each value repeated in place
                fy, fx = h // sh, w // sw
                target.view(b, len(own), sh, fy, sw, fx).copy_(picked[:, :, :, None, :, None].expand(-1, -1, -1, fy, -1, fx))
            else:
                target.copy_(F.interpolate(picked, size=(h, w), mode="nearest"))
            filled, offset = filled + len(own), offset + channels
        return out

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, patches_per_chunk: int = 128) -> None:
        """embeddings (N, D, h, w) -> mean and regularised inverse covariance per patch.

        Patches are processed in chunks so the float64 working copy stays small even when
        a shared slot sees every tile of every image. Small chunks (128 patches x 100 x 100
        float64 = 10 MB) stay below glibc's 32 MB mmap threshold, so each chunk reuses the
        last one's freed memory instead of page-faulting fresh pages (1024 patches: ~2 GB of
        new pages per slot); the results are written into preallocated outputs. Chunks run on
        ``torch.get_num_threads()`` threads: batched Cholesky and triangular solves of small
        matrices use one core each (1.3-1.5x faster on 2 cores, bit-identical results).
        """
        n, d = embeddings.shape[:2]
        if n < 2:
            raise ConfigError("padim needs at least 2 training tiles per model slot")
        flat = embeddings.flatten(2)  # (N, D, P)
        eye = self.epsilon * torch.eye(d, dtype=torch.float64, device=flat.device)
        num_patches = flat.shape[-1]
        means = torch.empty(num_patches, d, device=flat.device)
        bounds = row_block_bounds(d)
        blocks = [torch.empty(num_patches, hi, hi - lo, device=flat.device) for lo, hi in zip(bounds, bounds[1:])]

        def fit_chunk(start: int) -> None:
            x = flat[..., start : start + patches_per_chunk].permute(2, 0, 1).double()  # (p, N, D)
            mean = x.mean(dim=1, keepdim=True)
            centered = x - mean
            covariance = centered.transpose(1, 2) @ centered / (n - 1) + eye
            # Whitening W = L^-1 with covariance = L L^T, so that |W delta|^2 is the squared
            # Mahalanobis distance; Cholesky + triangular solve is ~2x cheaper than a batched inverse.
            lower = torch.linalg.cholesky(covariance)
            identity = torch.eye(d, dtype=lower.dtype, device=lower.device).expand_as(lower)
            stop = start + len(x)
            means[start:stop] = mean.squeeze(1)
            whitening = torch.linalg.solve_triangular(lower, identity, upper=False)
            for block, (lo, hi) in zip(blocks, zip(bounds, bounds[1:])):
                block[start:stop] = whitening[:, lo:hi, :hi].transpose(1, 2)

        run_chunks(fit_chunk, range(0, num_patches, patches_per_chunk), flat.device)
        self.mean = means
        for i, block in enumerate(blocks):
            setattr(self, f"whitening_{i}", block)

    def forward(self, embedding: torch.Tensor, output_size: tuple[int, int], patches_per_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (B, D, h, w) -> anomaly map (B, H, W) and image score = max of the map.

        Patch chunks keep the (patches, B, D) temporaries small (32 tiles: 3 MB per chunk instead of
        3 x 52 MB for all patches at once), so they reuse freed memory instead of fresh pages. Chunks
        run one after another: on contiguous operands bmm uses torch's intra-op threads itself, and a
        thread per chunk on top oversubscribed the cores (2 threads, 16,384 positions, batch 1:
        32.6 ms with a chunk thread pool, 20.7 ms without).
        """
        b, d, h, w = embedding.shape
        flat = embedding.flatten(2)  # (B, D, P)
        squared = embedding.new_zeros(h * w, b)
        ends, blocks = row_block_bounds(d)[1:], self.whitening_blocks

        for start in range(0, h * w, patches_per_chunk):
            stop = min(start + patches_per_chunk, h * w)
            # contiguous(): the difference keeps the permuted strides, and bmm on that layout takes a
            # slow path (36,864 positions, batch 1: 2x slower; the results are bit-identical)
            delta = (flat[:, :, start:stop].permute(2, 0, 1) - self.mean[start:stop].unsqueeze(1)).contiguous()  # (p, B, D)
            total = squared[start:stop]
            for end, block in zip(ends, blocks):  # |W delta|^2 summed over W's row blocks
                total += torch.bmm(delta[:, :, :end], block[start:stop]).square_().sum(-1)
        maps = squared.sqrt_().t().reshape(b, h, w)
        maps = gaussian_blur(upsample(maps, output_size), self.blur_sigma)
        return maps, maps.flatten(1).amax(dim=1)

    def pack_state(self, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoints keep the whitening matrix's lower triangle only (it is the inverse of a
        Cholesky factor), in ``torch.tril_indices`` order: bit-exact (165 -> 83 MB per 256 px slot, D = 100)."""
        names = [f"{prefix}whitening_{i}" for i in range(ROW_BLOCKS)]
        if state.get(names[0], torch.empty(0)).dim() == 3:
            blocks = [state.pop(name) for name in names]
            positions = block_tril_indices(blocks[-1].shape[-2])
            state[prefix + "whitening_tril"] = torch.cat([block[:, c, r] for block, (c, r) in zip(blocks, positions)], dim=1)
        return state

    def unpack_state(self, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        if prefix + "whitening_tril" in state:
            packed, d = state.pop(prefix + "whitening_tril"), len(state[prefix + "channel_index"])
            bounds, offset = row_block_bounds(d), 0
            for i, ((lo, hi), (c, r)) in enumerate(zip(zip(bounds, bounds[1:]), block_tril_indices(d))):
                block = packed.new_zeros(len(packed), hi, hi - lo)
                block[:, c, r] = packed[:, offset : offset + len(c)]
                state[f"{prefix}whitening_{i}"], offset = block, offset + len(c)
        return state
