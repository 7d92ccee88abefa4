"""EfficientAD as a model slot: teacher set up at fit start, student + autoencoder trained on raw tiles.

How a slot learns (CPU-feasible, same losses as the paper):
- ``split_training_data`` holds out a seeded share of the slot's normal tiles: no gradient step
  ever sees them; the map quantiles are fitted on them in ``on_train_end``.
- ``on_fit_start``: teacher weights (``teacher`` file, or the cached / freshly distilled one),
  then the teacher's channel mean/std over the slot's training tiles.
- each step takes a batch of tiles.  Teacher and student run on random crops: the unpadded PDN
  is fully convolutional, so a crop at an offset that is a multiple of its stride (4) yields
  exactly a window of the whole tile's output, and every loss term on crops is the same term on
  a sample of the output cells.  The autoencoder always sees whole (augmented) tiles; its output
  is compared, window by window, with the teacher and the student's second half on the crops.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from tiled_hydra.config import (
    Count, File, Folder, Increasing, Layers, Length, NonNegative, Positive, Range, positive_size,
)
from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.core.tiling import as_pair
from tiled_hydra.errors import ConfigError
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.models.efficient_ad.corpus import ImageCorpus
from tiled_hydra.models.efficient_ad.settings import MIN_TILE, DistillSettings
from tiled_hydra.models.efficient_ad.teacher import DistillRecipe, distilled_teacher, load_teacher_file
from tiled_hydra.models.efficient_ad.torch_model import (
    EfficientAdModel,
    check_tile,
    hard_feature_loss,
    penalty_loss,
)


def fused_adam_options() -> dict:
    """``fused=True`` where torch has fused Adam kernels for CPU and CUDA (>= 2.4): one kernel per
    step instead of a Python loop over every parameter tensor (the loop was ~2 % of an EfficientAD
    step on 2 CPU threads); older torch keeps its default."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return {"fused": True} if (major, minor) >= (2, 4) else {}


PDN_STRIDE = 4  # crops start on multiples of the PDN's stride so their outputs align with the tile's


def color_jitter(tiles: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """The reference's autoencoder augmentation: one of brightness, contrast or saturation x U(1-s, 1+s) per tile."""
    out = []
    for tile in tiles:
        factor = 1 - strength + 2 * strength * float(torch.rand((), generator=generator))
        kind = int(torch.randint(3, (1,), generator=generator))
        if kind == 0:
            tile = tile * factor
        elif kind == 1:
            tile = (tile - tile.mean()) * factor + tile.mean()  # contrast around the mean intensity
        else:
            gray = tile.mean(dim=0, keepdim=True)
            tile = (tile - gray) * factor + gray
        out.append(tile.clamp(0, 1))
    return torch.stack(out)


class EfficientAd(AnomalyModule):
    trainable = True
    cache_embeddings = False  # learns from raw tiles: the frozen backbone only distils the teacher

    def __init__(
        self,
        backbone: FrozenBackbone,
        layers: Layers,
        size: Literal["small", "medium"],
        tile_size: positive_size(MIN_TILE),
        teacher: File | None,
        penalty: bool,
        penalty_dir: Folder | None,
        distill_dir: Folder | None,
        teacher_cache: str | None,
        distill: DistillSettings,
        crop_size: Annotated[int, Range(MIN_TILE)],  # px, capped at the tile size
        crops_per_tile: Count,
        hard_quantile: Annotated[float, Range(0, 1)],
        ae_jitter: Annotated[float, Range(0, 1, high_open=True)],  # factors in (1 - s, 1 + s) stay positive
        ae_loss_area: Literal["tile", "crops"],
        penalty_images: Count | None,
        dropout: Annotated[float, Range(0, 1, high_open=True)],
        precision: Literal["32", "bf16", 32],
        quantile_holdout: Annotated[float, Range(0, 1, low_open=True, high_open=True)],
        min_holdout: Count,
        map_quantiles: Annotated[list[Annotated[float, Range(0, 1)]], Length(2), Increasing()],  # q_a < q_b
        lr: Positive,
        weight_decay: NonNegative,
        lr_drop_at: Annotated[float, Range(0, 1, low_open=True)],  # share of max_steps
    ):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        height, width = as_pair(tile_size)
        check_tile(height, width)
        if not 0 < quantile_holdout < 1 or min_holdout < 1:
            raise ConfigError("efficient_ad: model.net.quantile_holdout must be in (0, 1) and min_holdout >= 1")
        if ae_loss_area not in ("tile", "crops"):
            raise ConfigError(f"efficient_ad: model.net.ae_loss_area must be tile or crops, got '{ae_loss_area}'")
        if crop_size < 64:
            raise ConfigError("efficient_ad: model.net.crop_size must be at least 64 px (the PDN's smallest input)")
        self.model = EfficientAdModel(size, (height, width), dropout, str(precision)).to(memory_format=torch.channels_last)
        self._holdout: Dataset | None = None
        self._penalty: ImageCorpus | None = None
        self._generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**63)

    # -- data: a held-out share of the normal tiles for the map quantiles ----------------------------
    def split_training_data(self, dataset: Dataset) -> Dataset:
        n = len(dataset)
        if n < 2:
            raise ConfigError("efficient_ad needs at least 2 training tiles per slot (one held out for the map quantiles)")
        held = min(n - 1, max(self.hparams.min_holdout, round(self.hparams.quantile_holdout * n)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(torch.initial_seed()) % 2**63)).tolist()
        self._holdout = Subset(dataset, sorted(order[:held]))
        return Subset(dataset, sorted(order[held:]))

    # -- train start: teacher weights and statistics (the train loader exists from here on) ------------------------------------------------------
    def on_train_start(self) -> None:
        hp = self.hparams
        if hp.teacher:
            state = load_teacher_file(hp.teacher, hp.size)
        else:
            recipe = DistillRecipe(**{k: (float(v) if k in ("lr", "weight_decay") else int(v)) for k, v in dict(hp.distill).items()})
            state = distilled_teacher(self.backbone, hp.size, recipe, hp.distill_dir, hp.teacher_cache)
        self.model.teacher.load_state_dict(state)
        loader = self.trainer.train_dataloader
        self.model.fit_teacher_statistics(self._prepare(tiles[0].to(self.device)) for tiles in loader)
        if hp.penalty:
            self._penalty = ImageCorpus(hp.penalty_dir)

    def _prepare(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model.prepare(tiles).contiguous(memory_format=torch.channels_last)

    def _crops(self, tiles: torch.Tensor, side: tuple[int, int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``crops_per_tile`` random crops per tile, at offsets that are multiples of the PDN stride."""
        h, w = tiles.shape[-2:]
        crops, offsets = [], []
        for tile in tiles:
            for _ in range(self.hparams.crops_per_tile):
                y = PDN_STRIDE * int(torch.randint((h - side[0]) // PDN_STRIDE + 1, (1,), generator=self._generator))
                x = PDN_STRIDE * int(torch.randint((w - side[1]) // PDN_STRIDE + 1, (1,), generator=self._generator))
                crops.append(tile[:, y : y + side[0], x : x + side[1]])
                offsets.append((y // PDN_STRIDE, x // PDN_STRIDE))
        return torch.stack(crops), offsets

    # -- one step ---------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        hp, model = self.hparams, self.model
        tiles = batch[0]
        side = (min(hp.crop_size, tiles.shape[-2]), min(hp.crop_size, tiles.shape[-1]))

        # Student vs teacher on crops of the normal tiles: only the hardest 0.1% of the features count.
        crops, _ = self._crops(tiles, side)
        x = self._prepare(crops)
        loss_st = hard_feature_loss(model.teacher_features(x), model.student_half(x, 0), hp.hard_quantile)
        loss = loss_st
        if self._penalty is not None:
            images = self._penalty.sample(hp.penalty_images or len(crops), side[0], self._generator, grayscale=0.3).to(self.device)
            if side[1] != side[0]:
                images = F.interpolate(images, size=side, mode="bilinear", align_corners=False)
            loss_penalty = penalty_loss(model.student_half(self._prepare(images), 0))
            loss = loss + loss_penalty
            self.log("loss_penalty", loss_penalty)

        # Autoencoder on whole augmented tiles.  The student's second half runs on a crop and is
        # compared with the autoencoder's output window by window (the same term, sampled).  The
        # autoencoder's own loss is taken on its whole output (ae_loss_area=tile, the paper's term:
        # the teacher runs once on the whole augmented tile) or on the crop windows only (crops).
        augmented = color_jitter(tiles, hp.ae_jitter, self._generator)
        x_tiles = self._prepare(augmented)
        ae_out = model.reconstruct(x_tiles)
        aug_crops, offsets = self._crops(augmented, side)
        student_ae = model.student_half(self._prepare(aug_crops), 1)
        oh, ow = student_ae.shape[-2:]
        per_tile = hp.crops_per_tile
        windows = torch.stack([ae_out[i // per_tile, :, a : a + oh, b : b + ow] for i, (a, b) in enumerate(offsets)])
        if hp.ae_loss_area == "tile":
            loss_ae = (model.teacher_features(x_tiles) - ae_out).pow(2).mean()
        else:
            loss_ae = (model.teacher_features(self._prepare(aug_crops)) - windows).pow(2).mean()
        loss_stae = (windows - student_ae).pow(2).mean()
        loss = loss + loss_ae + loss_stae
        self.log_dict({"loss_st": loss_st, "loss_ae": loss_ae, "loss_stae": loss_stae})
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        params = list(self.model.student.parameters()) + list(self.model.autoencoder.parameters())
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused_adam_options())
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else 70_000
        drop = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, math.ceil(hp.lr_drop_at * max_steps)), gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": drop, "interval": "step"}}

    # -- fit end: map quantiles on the held-out normal tiles ---------------------------------------------
    @torch.no_grad()
    def on_train_end(self) -> None:
        self.model.eval()
        maps_st, maps_ae = [], []
        batch_size = max(1, int(self.trainer.train_dataloader.batch_size or 1))
        for start in range(0, len(self._holdout), batch_size):
            tiles = torch.stack([self._holdout[i][0] for i in range(start, min(start + batch_size, len(self._holdout)))])
            map_st, map_ae = self.model.raw_maps(self._prepare(tiles.to(self.device)))
            maps_st.append(map_st.cpu())
            maps_ae.append(map_ae.cpu())
        q_a, q_b = self.hparams.map_quantiles
        self.model.fit_quantiles(torch.cat(maps_st), torch.cat(maps_ae), q_a, q_b)
        self._holdout = None

    @torch.no_grad()
    def predict_tiles(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(tiles.contiguous(memory_format=torch.channels_last))
