"""An exported tiled ensemble, loaded: images in, anomaly maps, scores and labels out.

    detector = load("exports/my_run")                 # manifest read, file hashes verified
    result = detector.score_files(["a.png", "b.png"])  # Scored per file (or the error it raised)
    maps, scores = detector.predict(pixels)            # uint8 (N, 3, H, W) at detector.image_size

One batch of images goes through the graphs as the inference engine's resident mode runs them:
the backbone graph (when the model takes backbone features) once over every tile, or once over
each whole padded image (``features: whole_image``), then each slot's graph on its own tiles; the
slot outputs are merged in slot order (:mod:`tiled_hydra_runtime.merge`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiled_hydra_runtime.backends import open_graph
from tiled_hydra_runtime.errors import RuntimeFailure
from tiled_hydra_runtime.filters import F32
from tiled_hydra_runtime.images import read_image, resize_image
from tiled_hydra_runtime.manifest import CALIBRATION_FILE, read_manifest
from tiled_hydra_runtime.merge import Calibration, Grid, Merger, MergeRule
from tiled_hydra_runtime.postprocess import Postprocessor


@dataclass
class Scored:
    """One file's result: ``map`` (H, W) at the setup's size, on the model's raw scale."""

    path: str
    size: tuple[int, int]  # the file's own (height, width)
    map: np.ndarray
    score: float
    normalized_score: float
    label: bool


@dataclass(frozen=True)
class Slot:
    graph: object
    tiles: list[int]
    calibration: Calibration | None


def _pair(values) -> tuple[int, int]:
    return int(values[0]), int(values[1])


class Detector:
    def __init__(self, artifact: str | Path, threads: int = 0, verify: bool = True, batch_size: int | None = None):
        self.artifact = Path(artifact).expanduser()
        self.manifest = manifest = read_manifest(self.artifact, verify)
        fmt = manifest["format"]
        self.grid = Grid(*(_pair(manifest["grid"][k]) for k in ("image_size", "tile_size", "stride")))
        self.image_size = self.grid.image_size
        self.features = manifest["features"]  # per_tile | whole_image | pixels
        self.reductions = [int(r) for r in manifest.get("reductions", [])]
        self.batch_size = int(batch_size or manifest["batch_size"])
        merge = manifest["merge"]
        smoothing = merge["seam_smoothing"]
        self.merger = Merger(self.grid, MergeRule(merge["score"], bool(smoothing["enabled"]), float(smoothing["sigma"]),
                                                  float(smoothing["width_fraction"]), merge["calibration"], merge["window"]))
        self.post = Postprocessor(**manifest["postprocess"]["postprocessor"])
        positions = np.load(self.artifact / CALIBRATION_FILE) if CALIBRATION_FILE in manifest["files"] else {}
        graphs = manifest["graphs"]
        self.backbone = open_graph(self.artifact / graphs["backbone"], fmt, threads) if graphs["backbone"] else None
        self.slots = []
        for k, slot in enumerate(graphs["slots"]):
            calibration = None
            if slot.get("calibration"):
                numbers = {key: slot["calibration"][key] for key in ("map_median", "map_spread", "score_median", "score_spread")}
                median, spread = positions.get(f"slot_{k:03d}_median"), positions.get(f"slot_{k:03d}_spread")
                calibration = Calibration(**numbers, position_median=median, position_spread=spread)
            self.slots.append(Slot(open_graph(self.artifact / slot["file"], fmt, threads), list(slot["tiles"]), calibration))
        if merge["calibration"] != "none" and any(s.calibration is None for s in self.slots):
            raise RuntimeFailure(f"{self.artifact}: merge.calibration={merge['calibration']} but a slot has no calibration statistics")

    # -- graphs ---------------------------------------------------------------------------------------
    def _backbone(self, pixels: np.ndarray) -> list[np.ndarray]:
        """Backbone stages of float32 inputs (B, 3, h, w), at most ``batch_size`` tiles' pixels per call."""
        per_call = max(1, self.batch_size * self.grid.tile_size[0] * self.grid.tile_size[1] // (pixels.shape[-2] * pixels.shape[-1]))
        parts = [self.backbone({self.backbone.inputs[0]: pixels[s : s + per_call]}) for s in range(0, len(pixels), per_call)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    def _stages(self, padded: np.ndarray) -> list[np.ndarray]:
        """Backbone stages of every tile of every image, image-major (N * T, C, th / r, tw / r)."""
        every = list(range(self.grid.num_tiles))
        if self.features == "per_tile":
            return self._backbone(self.grid.tiles(padded, every))
        whole = self._backbone(padded.astype(F32) / F32(255))
        out = []
        for stage, r in zip(whole, self.reductions):
            th, tw = self.grid.tile_size[0] // r, self.grid.tile_size[1] // r
            crops = [stage[:, :, y // r : y // r + th, x // r : x // r + tw] for y, x in map(self.grid.origin, every)]
            out.append(np.stack(crops, axis=1).reshape(-1, stage.shape[1], th, tw))
        return out

    def _run_slot(self, slot: Slot, inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A slot graph over its tiles, ``batch_size`` tiles per call."""
        maps, scores = [], []
        for s in range(0, len(inputs[0]), self.batch_size):
            out = slot.graph({name: x[s : s + self.batch_size] for name, x in zip(slot.graph.inputs, inputs)})
            maps.append(out[0])
            scores.append(out[1])
        return np.concatenate(maps), np.concatenate(scores)

    # -- public -----------------------------------------------------------------------------------------
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, 3, H, W) at ``image_size`` -> raw maps (N, H, W) and image scores (N,), float32."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"expected uint8 images (N, 3, {self.image_size[0]}, {self.image_size[1]}), got {images.shape}")
        padded = self.grid.pad(images)
        map_sum, tile_scores = self.merger.start(len(images))
        stages = self._stages(padded) if self.backbone is not None else None
        num_tiles = self.grid.num_tiles
        for slot in self.slots:
            if stages is None:
                inputs = [self.grid.tiles(padded, slot.tiles)]
            else:
                rows = (np.arange(len(images))[:, None] * num_tiles + np.asarray(slot.tiles)[None, :]).reshape(-1)
                inputs = [s if len(slot.tiles) == num_tiles else s[rows] for s in stages]
            maps, scores = self._run_slot(slot, inputs)
            self.merger.add(map_sum, tile_scores, slot.tiles, maps, scores, slot.calibration)
        return self.merger.result(map_sum, tile_scores)

    def read(self, path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
        """A file as the run's dataset read it: uint8 (3, H, W) at ``image_size``, and its own (height, width)."""
        image = read_image(Path(path))
        return resize_image(image, self.image_size), (image.height, image.width)

    def score_files(self, paths: list[str | Path]) -> list[Scored | RuntimeFailure]:
        """Each file's :class:`Scored`, or the one-line error that kept it from being read."""
        out: list[Scored | RuntimeFailure | None] = [None] * len(paths)
        readable, pixels, sizes = [], [], []
        for k, path in enumerate(paths):
            try:
                array, size = self.read(path)
            except RuntimeFailure as err:
                out[k] = err
                continue
            readable.append(k)
            pixels.append(array)
            sizes.append(size)
        if readable:
            maps, scores = self.predict(np.stack(pixels))
            normalized, labels = self.post.normalize_scores(scores), self.post.labels(scores)
            for i, k in enumerate(readable):
                out[k] = Scored(str(paths[k]), sizes[i], maps[i], float(scores[i]), float(normalized[i]), bool(labels[i]))
        return out


def load(artifact: str | Path, threads: int = 0, verify: bool = True, batch_size: int | None = None) -> Detector:
    """An exported run from its folder (``manifest.json`` and the graphs), hashes verified."""
    return Detector(artifact, threads, verify, batch_size)
