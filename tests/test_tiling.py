"""Tiling plan (paper Eq. 1-2): grid sizes, padding, exact round trip, overlap averaging."""

import pytest
import torch

from tiled_hydra.core.tiling import TileGrid


@pytest.mark.parametrize(
    "image, tile, stride, shape",
    [
        (512, 512, 512, (1, 1)),  # SM512
        (512, 256, 256, (2, 2)),  # ST4 / ENS4
        (512, 256, 128, (3, 3)),  # ST9 / ENS9: floor((512-256)/128)+1 = 3
        (1024, 256, 128, (7, 7)),  # 49 tiles
        ((512, 768), 256, 128, (3, 5)),  # non-square image
        (500, 256, 128, (3, 3)),  # ceil((500-256)/128)+1 = 3: last tile reaches into padding
    ],
)
def test_grid_shape(image, tile, stride, shape):
    grid = TileGrid.create(image, tile, stride)
    assert grid.shape == shape
    assert grid.num_tiles == shape[0] * shape[1]


def test_window_matches_eq2():
    grid = TileGrid.create(512, 256, 128)
    # T_{0,1} spans rows [0, 256) and columns [128, 384)
    assert grid.window(1) == (slice(0, 256), slice(128, 384))
    assert grid.location(5) == (1, 2)


@pytest.mark.parametrize("image, tile, stride", [(64, 32, 16), (64, 32, 32), (50, 32, 16), ((48, 70), (32, 24), (16, 20))])
def test_round_trip_is_exact(image, tile, stride):
    grid = TileGrid.create(image, tile, stride)
    x = torch.rand(2, 3, *grid.image_size)
    tiles = grid.tile(x)
    assert tiles.shape == (2, grid.num_tiles, 3, *grid.tile_size)
    assert torch.allclose(grid.untile(tiles), x, atol=1e-6)


def test_tiles_are_the_eq2_windows_and_padding_is_zero():
    grid = TileGrid.create(50, 32, 16)  # padded to 64: rows 50..63 are zeros
    x = torch.rand(1, 1, 50, 50) + 1  # strictly positive so zeros can only be padding
    tiles = grid.tile(x)
    last = tiles[0, -1, 0]  # T_{2,2} covers [32, 64) x [32, 64)
    assert torch.equal(last[:18, :18], x[0, 0, 32:50, 32:50])
    assert torch.count_nonzero(last[18:, :]) == 0 and torch.count_nonzero(last[:, 18:]) == 0


def test_overlaps_are_averaged():
    grid = TileGrid.create(8, 4, 2)  # 3x3 tiles
    tiles = torch.arange(grid.num_tiles, dtype=torch.float32).view(1, -1, 1, 1, 1).expand(1, -1, 1, 4, 4)
    merged = grid.untile(tiles)[0, 0]
    # pixel (3, 3) is covered by tiles (0,0), (0,1), (1,0), (1,1) -> indices 0, 1, 3, 4 -> mean 2
    assert merged[3, 3] == pytest.approx(2.0)
    # pixel (0, 0) only by tile 0; pixel (7, 7) only by tile 8
    assert merged[0, 0] == 0 and merged[7, 7] == 8
    assert grid.coverage()[3, 3] == 4 and grid.coverage()[0, 0] == 1


def test_add_tile_accumulates_like_untile_sum():
    grid = TileGrid.create(50, 32, 16)
    maps = torch.rand(2, grid.num_tiles, 32, 32)
    buffer = torch.zeros(2, 50, 50)
    for t in range(grid.num_tiles):
        grid.add_tile(buffer, maps[:, t], t)
    assert torch.allclose(buffer, grid.untile_sum(maps.unsqueeze(2))[:, 0], atol=1e-5)


def test_seams_of_ens9_and_ens4():
    assert TileGrid.create(512, 256, 128).seams() == ([128, 256, 384], [128, 256, 384])
    assert TileGrid.create(512, 256, 256).seams() == ([256], [256])
    assert TileGrid.create(256, 256, 256).seams() == ([], [])


@pytest.mark.parametrize(
    "image, tile, stride, message",
    [(512, 256, 300, "stride"), (256, 512, 256, "larger than the image"), (512, 0, 128, "positive")],
)
def test_bad_plans_are_refused(image, tile, stride, message):
    with pytest.raises(ValueError, match=message):
        TileGrid.create(image, tile, stride)


def test_tile_subset_equals_the_same_tiles_of_the_full_tiling():
    grid = TileGrid.create((50, 70), 32, 16)  # padding on both axes
    x = torch.randint(0, 255, (2, 3, 50, 70), dtype=torch.uint8)
    chosen = [0, 4, grid.num_tiles - 1]
    assert torch.equal(grid.tile_subset(x, chosen), grid.tile(x)[:, chosen])


def test_lazy_tiles_are_the_tile_features_pixels_in_image_major_order():
    # Training reads a slot's tiles lazily (LazyTiles: models that fold raw tiles into statistics) or in
    # chunks through TileFeatures.pixels (inference, cached embeddings): the same tiles, the same order.
    from tests.helpers import efficientnet
    from tiled_hydra.core.features import TileFeatures, chunks
    from tiled_hydra.slots.trainer import LazyTiles

    grid = TileGrid.create(64, 32, 16)
    x = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    tiles = [1, 5]
    lazy = torch.stack([LazyTiles(x, grid, tiles)[i][0] for i in range(6)])
    features = TileFeatures(efficientnet([1, 2, 3]), grid, torch.device("cpu"), "per_tile", batch_size=4)
    eager = torch.cat([features.pixels(x, chunk, tiles) for chunk in chunks(len(x), 4 // len(tiles))])
    assert torch.equal(lazy, eager)
    # image-major: image 0's tiles 1 and 5, then image 1's, ...; each the tile's window of the image
    rows, cols = grid.window(5)
    assert torch.equal(eager[3], x[1, :, rows, cols].float() / 255)


def test_chunks_cover_every_item_once():
    from tiled_hydra.core.features import chunks

    assert [(c.start, c.stop) for c in chunks(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert [(c.start, c.stop) for c in chunks(2, 0)] == [(0, 1), (1, 2)]  # at least one per chunk
    assert list(chunks(0, 4)) == []
