"""PaDiM with incremental truncated PCA per patch (paper 002: Eq. 3-9, §3.3).

Every patch location p of the feature grid has its own Gaussian. Instead of keeping all
training features (or an m x m covariance) per patch, the model keeps the top-k
factor ``U_k diag(s)`` of the patch's Gram matrix sum_i x_i x_i^T and folds in ``step``
new samples at a time, for all P patches in one batched call.

Shapes: P patches, m feature dims, k kept dims, n samples (one sample = one tile).
Samples enter as (P, m, n): column i is the feature vector x_i, as X_b in the paper.

Reading of the paper that this code follows:
- The update (Eq. 4-6) works on W = [U_k diag(s), X_b]; §3.3 replaces the SVD of W by
  an eigendecomposition of the small (k+n_b)x(k+n_b) matrix W^T W and keeps the product
  U_k diag(s) = W V_k un-normalised until the finalisation.
- The very first update waits for k + step samples, so W is always (k+step) wide (§4).
- Finalisation (Eq. 7-9) projects the mean onto span(U_k) and diagonalises the k x k
  matrix diag(s^2)/(n-1) - n/(n-1) U_k^T mu mu^T U_k; its eigenvalues are the variances.
- The score (Eq. 3) is the Mahalanobis distance inside the kept subspace only:
  sqrt(sum_j (u_j^T (x - mu))^2 / lambda_j). The orthogonal complement contributes
  nothing: the paper replaces Sigma^-1 by U_k diag(1/lambda) U_k^T, no residual term.
"""

from __future__ import annotations

import torch
from torch import nn

from tiled_hydra.errors import ConfigError
from tiled_hydra.core.filters import gaussian_blur, upsample
from tiled_hydra.models.padim.torch_model import concat_stages

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"padim_ipca dtype must be one of {sorted(DTYPES)}, got '{name}'")
    return DTYPES[name]


class IncrementalTruncatedPCA(nn.Module):
    """Top-k PCA of P independent sample streams, updated ``step`` samples at a time.

    Training state (transient, not checkpointed; freed by :meth:`finalize`):
      scaled_basis (P, m, c<=k)  U_k diag(s) of the Gram matrix, normalisation deferred (§3.3)
      feature_sum  (P, m)        x_a of §3.2, for the mean
      pending      (P, m, <k+step) samples waiting for the next update
    Result (checkpointed): mean (P, m), components (P, m, c) orthonormal columns,
    variances (P, c) in descending order.
    """

    def __init__(self, k: int = 16, step: int = 16, dtype: torch.dtype = torch.float64):
        super().__init__()
        if k < 1 or step < 1:
            raise ConfigError(f"padim_ipca needs k >= 1 and step >= 1, got k={k}, step={step}")
        self.k, self.step, self.dtype = int(k), int(step), dtype
        for name in ("scaled_basis", "feature_sum", "pending"):
            self.register_buffer(name, torch.empty(0, dtype=dtype), persistent=False)
        self.count = 0
        self.register_buffer("mean", torch.empty(0, dtype=dtype))
        self.register_buffer("components", torch.empty(0, dtype=dtype))
        self.register_buffer("variances", torch.empty(0, dtype=dtype))

    @property
    def has_basis(self) -> bool:
        return self.scaled_basis.numel() > 0

    def samples_needed(self) -> int:
        # The first decomposition collects k + step samples (paper §4), later ones step.
        return self.step if self.has_basis else self.k + self.step

    @torch.no_grad()
    def partial_fit(self, samples: torch.Tensor) -> None:
        """Accumulate samples (P, m, n); run an update (Eq. 6) whenever enough are pending.

        Only slices of ``samples`` are converted to the working dtype, and only fewer than
        ``samples_needed()`` of them are kept between calls: memory does not depend on n.
        """
        if self.count == 0:
            self.feature_sum = torch.zeros(samples.shape[:2], dtype=self.dtype, device=samples.device)
            self.pending = torch.empty(*samples.shape[:2], 0, dtype=self.dtype, device=samples.device)
        self.feature_sum += samples.sum(-1, dtype=self.dtype)
        self.count += samples.shape[-1]
        start = 0
        while self.pending.shape[-1] + samples.shape[-1] - start >= self.samples_needed():
            take = self.samples_needed() - self.pending.shape[-1]
            self.update(self.pending, samples[..., start : start + take].to(self.dtype))
            self.pending = self.pending.new_empty(*self.pending.shape[:2], 0)  # a [..., :0] view would pin the old storage
            start += take
        self.pending = torch.cat([self.pending, samples[..., start:].to(self.dtype)], dim=-1)

    @torch.no_grad()
    def update(self, *batch: torch.Tensor) -> None:
        """One step of Eq. 4-6 in the form of §3.3, for every patch at once.

        ``batch``: the step's samples X_b, possibly in several (P, m, *) parts.
        W = [U_k diag(s), X_b] satisfies W W^T = U_k diag(s^2) U_k^T + X_b X_b^T (Eq. 5).
        With W^T W = V diag(s'^2) V^T, the top-k part of W V is U'_k diag(s'): the new
        factor, obtained from a (k+n_b)-sized eigenproblem instead of an SVD of W.
        """
        w = torch.cat([self.scaled_basis, *batch] if self.has_basis else batch, dim=-1)
        _, eigenvectors = torch.linalg.eigh(w.mT @ w)  # ascending eigenvalues
        keep = min(self.k, w.shape[-1])
        self.scaled_basis = w @ eigenvectors[..., -keep:]

    @torch.no_grad()
    def finalize(self) -> None:
        """Fold in the last partial step, then correct for the mean (Eq. 7-9)."""
        if self.count < 2:
            raise ConfigError(f"padim_ipca needs at least 2 training samples per patch, got {self.count}")
        if self.pending.shape[-1] > 0:
            self.update(self.pending)  # the last step may hold fewer than `step` samples (§4)
        n = self.count
        mean = self.feature_sum / n
        # Eq. 7-9 need an orthonormal basis of span(U_k). §3.3 obtains it by normalising the
        # columns of U_k diag(s) here; QR does the same (Q = U_k, R = diag(s) up to signs when
        # the columns are orthogonal) but stays exact when round-off or a rank below k has
        # left a column tiny and no longer orthogonal, which plain normalisation would blow up.
        basis, triangular = torch.linalg.qr(self.scaled_basis)  # U_k diag(s) = Q R, so G ~ Q (R R^T) Q^T
        mean_in_basis = basis.mT @ mean.unsqueeze(-1)  # U_k^T mu, (P, c, 1)
        middle = (triangular @ triangular.mT - n * mean_in_basis @ mean_in_basis.mT) / (n - 1)  # Eq. 9
        variances, rotation = torch.linalg.eigh(middle)  # R diag(lambda) R^T
        self.mean = mean
        self.components = (basis @ rotation).flip(-1)  # U_k R, largest variance first
        self.variances = variances.flip(-1)
        self.clear_training_state()

    def clear_training_state(self) -> None:
        for name in ("scaled_basis", "feature_sum", "pending"):
            setattr(self, name, torch.empty(0, dtype=self.dtype, device=self.mean.device))
        self.count = 0

    def inverse_variances(self, rtol: float) -> torch.Tensor:
        """1/lambda for kept directions, 0 for directions without variance (truncated pseudo-inverse).

        "Without variance" means lambda <= rtol * (largest variance of the model): directions
        that the data never spans (fewer samples than k, constant zero-padded patches) or
        negative round-off from the mean correction. They are dropped, as truncated SVD would.
        """
        threshold = rtol * self.variances.max().clamp_min(0)
        return torch.where(self.variances > threshold, 1.0 / self.variances.clamp_min(torch.finfo(self.dtype).tiny), 0.0)

    def mahalanobis(self, samples: torch.Tensor, rtol: float) -> torch.Tensor:
        """Eq. 3 within the kept subspace: samples (P, m, n) -> distances (P, n)."""
        delta = samples.to(self.dtype) - self.mean.unsqueeze(-1)
        projected = self.components.mT @ delta  # (P, c, n): U_k^T (x - mu)
        squared = (projected.square() * self.inverse_variances(rtol).unsqueeze(-1)).sum(-2)
        return squared.sqrt()


class PadimIPCAModel(nn.Module):
    """Feature construction as in PaDiM, incremental PCA per patch, Mahalanobis anomaly map."""

    def __init__(self, total_channels: int, n_features: int | None, k: int, step: int, dtype: str,
                 variance_rtol: float, blur_sigma: float):
        super().__init__()
        m = total_channels if n_features is None else int(n_features)
        if not 1 <= m <= total_channels:
            raise ConfigError(f"padim_ipca n_features={n_features} must be in [1, {total_channels}] (backbone channels)")
        if k > m:
            raise ConfigError(f"padim_ipca k={k} exceeds the feature dimension {m}")
        self.variance_rtol = float(variance_rtol)
        self.blur_sigma = float(blur_sigma)
        # Random channel subset from the (seeded) global RNG, kept in the checkpoint; None keeps all
        # channels, as the paper does (EfficientNet-B0 stages 3-6 = 256 dims).
        index = torch.arange(total_channels) if n_features is None else torch.randperm(total_channels)[:m].sort().values
        self.register_buffer("channel_index", index)
        self.pca = IncrementalTruncatedPCA(k, step, parse_dtype(dtype))

    def features(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """Backbone stages -> embedding (B, m, h, w) on the finest stage's grid."""
        return concat_stages(stages).index_select(1, self.channel_index)

    @staticmethod
    def patch_samples(embedding: torch.Tensor) -> torch.Tensor:
        """(B, m, h, w) -> (P, m, B): one sample column per tile, one problem per patch."""
        return embedding.flatten(2).permute(2, 1, 0)

    def partial_fit(self, embedding: torch.Tensor) -> None:
        self.pca.partial_fit(self.patch_samples(embedding))

    def finalize(self) -> None:
        self.pca.finalize()

    @torch.no_grad()
    def forward(self, embedding: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (B, m, h, w) -> anomaly maps (B, H, W) float32 and image scores = max of each map."""
        b, _, h, w = embedding.shape
        distances = self.pca.mahalanobis(self.patch_samples(embedding), self.variance_rtol)  # (P, B)
        maps = distances.mT.reshape(b, h, w).float()
        maps = gaussian_blur(upsample(maps, output_size), self.blur_sigma)
        return maps, maps.flatten(1).amax(dim=1)
