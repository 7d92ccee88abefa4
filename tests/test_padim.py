"""PaDiM math against a direct computation, and exact checkpoint round trip."""

import pytest
import torch

from tiled_hydra.models.backbone import build_backbone
from tiled_hydra.models.padim import Padim
from tiled_hydra.models.padim.torch_model import PadimModel


# threads 2: the fit's chunks run on a thread pool; d 2: a row block of the
# whitening is empty (bounds 0, 1, 1, 2)
@pytest.mark.parametrize("threads, d", [(1, 10), (2, 10), (1, 2)])
def test_map_is_the_mahalanobis_distance_of_the_regularised_sample_covariance(threads, d):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_mahalanobis_map(d)
    finally:
        torch.set_num_threads(previous)


def check_mahalanobis_map(d: int):
    torch.manual_seed(0)
    model = PadimModel(total_channels=20, n_features=d, epsilon=0.01, blur_sigma=0)
    train = torch.randn(30, d, 4, 4)
    model.fit(train, patches_per_chunk=5)  # chunks that do not divide 16 patches
    test = torch.randn(3, d, 4, 4)
    maps, scores = model(test, (4, 4), patches_per_chunk=3)  # 6 chunks, scored one after another
    assert torch.equal(maps, model(test, (4, 4), patches_per_chunk=16)[0])  # one chunk: bit-identical

    # Direct definition: torch.cov (unbiased) + epsilon I, explicit inverse, in float64.
    x = train.flatten(2).permute(2, 0, 1).double()
    cov = torch.stack([torch.cov(x[p].T) for p in range(16)]) + 0.01 * torch.eye(d, dtype=torch.float64)
    delta = test.flatten(2).permute(2, 0, 1).double() - x.mean(1, keepdim=True)
    expected = torch.einsum("pbd,pde,pbe->bp", delta, torch.linalg.inv(cov), delta).sqrt().reshape(3, 4, 4)
    assert torch.allclose(maps.double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(scores, maps.flatten(1).amax(1))


def test_slot_checkpoint_round_trip_is_exact():
    backbone = build_backbone("efficientnet_lite0", "tf_efficientnet_lite0", "none", [1, 2, 3], [0.5] * 3, [0.5] * 3)
    torch.manual_seed(1)
    slot = Padim(backbone, layers=[1, 2, 3], n_features=20, epsilon=0.01, blur_sigma=4.0)
    tiles = torch.rand(6, 3, 32, 32)
    slot.model.fit(slot.embed(tiles))
    state = slot.slot_state_dict()
    assert not any(k.startswith("backbone.") for k in state)

    torch.manual_seed(2)  # a different random channel subset until the checkpoint is loaded
    restored = Padim(backbone, layers=[1, 2, 3], n_features=20, epsilon=0.01, blur_sigma=4.0)
    restored.load_slot_state_dict(state)
    for a, b in zip(slot.predict_tiles(tiles), restored.predict_tiles(tiles)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("finest", [16, 15])  # 15: the coarser stages are not whole fractions -> interpolate
def test_embedding_equals_selecting_from_the_upsampled_concatenation(finest):
    from tiled_hydra.models.padim.torch_model import concat_stages

    torch.manual_seed(2)
    model = PadimModel(total_channels=24, n_features=10, epsilon=0.01, blur_sigma=0)
    stages = [torch.randn(3, 4, finest, finest), torch.randn(3, 8, 8, 8), torch.randn(3, 12, 4, 4)]
    expected = concat_stages(stages).index_select(1, model.channel_index)
    assert torch.equal(model.embed(stages), expected)


@pytest.mark.parametrize("d", [1, 2, 3, 10, 100])
def test_whitening_blocks_hold_the_triangle_and_the_checkpoint_keeps_its_packed_form(d):
    """Row blocks keep every lower-triangle entry once; the checkpoint's ``whitening_tril`` is the
    triangle in torch.tril_indices order (the format before the blocks: old checkpoints load)."""
    from tiled_hydra.models.padim.torch_model import ROW_BLOCKS, join_row_blocks, row_block_bounds

    torch.manual_seed(3)
    model = PadimModel(total_channels=max(d, 2), n_features=d, epsilon=0.01, blur_sigma=0)
    model.fit(torch.randn(max(2 * d, 4), d, 2, 3))
    whitening = join_row_blocks(model.whitening_blocks)  # (P, D, D)
    assert torch.equal(whitening, whitening.tril()) and bool((whitening.diagonal(dim1=1, dim2=2) > 0).all())
    bounds = row_block_bounds(d)
    stored = sum(t.numel() for t in model.whitening_blocks)
    assert stored == 6 * sum((hi - lo) * hi for lo, hi in zip(bounds, bounds[1:]))  # 6 patches
    rows, cols = torch.tril_indices(d, d)
    state = model.pack_state(dict(model.state_dict()), "")
    assert not any(k.startswith("whitening_") and k != "whitening_tril" for k in state)
    assert torch.equal(state["whitening_tril"], whitening[:, rows, cols])
    restored = model.unpack_state(dict(state), "")
    for i in range(ROW_BLOCKS):
        assert torch.equal(restored[f"whitening_{i}"], getattr(model, f"whitening_{i}"))
