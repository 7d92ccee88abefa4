"""EfficientAD's teacher: load a PDN state dict, or distil one offline from the run's frozen backbone.

Distillation follows the reference ``pretraining.py``: the backbone sees a crop at twice the
PDN's input size, the patch features of its stages (3x3 average pooling, every stage resized to
the first stage's grid) are concatenated, average-pooled over channels to 384 and normalised
per channel over the corpus; a padded PDN learns them with MSE.  A distilled teacher is cached
per (backbone weights, PDN size, recipe) and reused by every later slot and run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tiled_hydra.errors import ConfigError
from tiled_hydra.models.efficient_ad.corpus import ImageCorpus
from tiled_hydra.models.efficient_ad.torch_model import IMAGENET_MEAN, IMAGENET_STD, OUT_CHANNELS, pdn

log = logging.getLogger("tiled_hydra")

RECIPE_VERSION = 1  # part of the cache key: bump when the distillation code changes its result
CACHE_ENV = "TILED_HYDRA_TEACHER_CACHE"


@dataclass(frozen=True)
class DistillRecipe:
    steps: int
    batch_size: int
    crop_size: int
    lr: float
    weight_decay: float
    stats_batches: int
    seed: int


def load_teacher_file(path: str, size: str) -> dict[str, torch.Tensor]:
    """A PDN state dict (the public EfficientAD teacher files' layout) checked against ``size``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.teacher file not found: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: truncated, not a torch file, pickled code
        raise ConfigError(f"model.teacher {file} is not a readable PyTorch state dict ({type(err).__name__}); re-download or re-create it") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    reference = pdn(size, OUT_CHANNELS).state_dict()
    if not isinstance(state, dict) or {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)} != {
        k: tuple(v.shape) for k, v in reference.items()
    }:
        raise ConfigError(f"model.teacher {file} is not a PDN-{size} state dict (wrong keys or shapes); check model.size")
    return {k: v.float() for k, v in state.items()}


def backbone_digest(backbone: nn.Module) -> str:
    """Hash of the backbone's weights: a teacher is only reused for the very backbone it learnt from."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | None, backbone_name: str, size: str, key: dict) -> Path:
    root = cache_dir or os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiled_hydra" / "teachers"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root).expanduser() / f"{backbone_name}_{size}_{digest}.pt"


class DistillTarget(nn.Module):
    """The backbone's normalised, channel-pooled patch features at the padded PDN's output grid."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.zeros(1, OUT_CHANNELS, 1, 1))
        self.register_buffer("std", torch.ones(1, OUT_CHANNELS, 1, 1))

    @torch.no_grad()
    def raw(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        big = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
        stages = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in self.backbone(big)]
        stages = [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in stages]
        features = torch.cat(stages, dim=1)
        b, c, h, w = features.shape
        # Average over neighbouring channels to 384 (with fewer channels, e.g. EfficientNet-Lite0's
        # 152, neighbouring bins overlap: the target keeps the backbone's rank).
        pooled = F.adaptive_avg_pool1d(features.permute(0, 2, 3, 1).reshape(-1, 1, c), OUT_CHANNELS)
        return pooled.view(b, h, w, OUT_CHANNELS).permute(0, 3, 1, 2)

    @torch.no_grad()
    def fit(self, batches: list[tuple[torch.Tensor, tuple[int, int]]]) -> None:
        features = torch.cat([self.raw(x, grid).transpose(0, 1).flatten(1) for x, grid in batches], dim=1)
        self.mean.copy_(features.mean(dim=1).view(1, -1, 1, 1))
        self.std.copy_(features.std(dim=1).clamp_min(1e-6).view(1, -1, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return (self.raw(images, grid) - self.mean) / self.std


def distill_teacher(backbone: nn.Module, size: str, recipe: DistillRecipe, corpus: ImageCorpus) -> dict[str, torch.Tensor]:
    """Train a padded PDN on the backbone's features; returns its state dict (used unpadded afterwards)."""
    # The global RNG is left as it was: a slot trains the same whether its teacher came from the cache or not.
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        return _distill(backbone, size, recipe, corpus)


def _distill(backbone: nn.Module, size: str, recipe: DistillRecipe, corpus: ImageCorpus) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(recipe.seed)
    student = pdn(size, OUT_CHANNELS, padded=True).to(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    grid = (recipe.crop_size // 4, recipe.crop_size // 4)
    target = DistillTarget(backbone)
    target.fit([(corpus.sample(recipe.batch_size, recipe.crop_size, generator), grid) for _ in range(recipe.stats_batches)])
    optimizer = torch.optim.Adam(student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(0.95 * recipe.steps)), gamma=0.1)
    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(recipe.steps):
        images = corpus.sample(recipe.batch_size, recipe.crop_size, generator)
        goal = target(images, grid)
        out = student(((images - mean) / std).contiguous(memory_format=torch.channels_last))
        loss = F.mse_loss(F.interpolate(out, size=grid, mode="bilinear", align_corners=False) if out.shape[-2:] != grid else out, goal)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % max(1, recipe.steps // 10) == 0:
            log.info("teacher distillation step %d/%d: loss %.4f (%.0f s)", step + 1, recipe.steps, loss.item(), time.perf_counter() - started)
    return {k: v.detach().contiguous() for k, v in student.state_dict().items()}


def distilled_teacher(backbone, size: str, recipe: DistillRecipe, distill_dir: str | None, cache_dir: str | None) -> dict[str, torch.Tensor]:
    """The cached teacher for this backbone, size and recipe, distilled (once) when absent."""
    corpus = ImageCorpus(distill_dir)
    key = {"version": RECIPE_VERSION, "backbone": backbone_digest(backbone), "size": size, "recipe": asdict(recipe),
           "corpus": corpus.identity}
    path = cache_path(cache_dir, getattr(backbone, "name", "backbone"), size, key)
    if path.is_file():
        try:
            return load_teacher_file(str(path), size)
        except ConfigError:
            log.warning("cached teacher %s is unreadable: distilling it again", path)
    log.info("distilling the EfficientAD %s teacher from %s (%d steps, one-time; cached at %s)",
             size, getattr(backbone, "name", "the backbone"), recipe.steps, path)
    started = time.perf_counter()
    state = distill_teacher(backbone, size, recipe, corpus)
    log.info("teacher distilled in %.0f s", time.perf_counter() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a concurrent or interrupted run never reads half a file
    return state
