"""Score new images with a trained run: ``python -m tiled_hydra.predict run_dir=DIR input=DIR_OR_GLOB``.

Options (``key=value``):

- ``run_dir``: a finished run (``.hydra/config.yaml``, every ``checkpoints/slot_*.pt``, ``postprocess.json``).
- ``input``: a folder (every image below it, recursively) or a glob pattern (``'imgs/**/*.png'``).
- ``output``: where to write (default ``predictions/<run dir name>`` in the current folder).
  Nothing in the run dir is ever modified.
- ``maps``: ``png`` (16-bit PNG of the normalised map, pixel threshold at 32768) or ``npy``
  (the raw float32 map); both at the image's own size.
- ``batch_size``: images per inference step (default 8).
- ``mode``: ``sequential`` | ``resident`` (default: the run's ``inference.mode``).
- ``device``: ``auto`` | ``cpu`` | ``gpu`` (default: the run's ``trainer.accelerator``).

Writes ``OUTPUT/maps/NAME.{png,npy}``, ``OUTPUT/overlays/NAME.png`` and ``OUTPUT/predictions.csv``
(path, raw score, normalised score, predicted label, anomalous area), and ``OUTPUT/failed.csv``
when some files could not be read. Images of any size, aspect or channel count are read and
resized as the run's dataset did. Exit code 0 when every file was scored, 1 otherwise.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from tiled_hydra.backbone import build_backbone
from tiled_hydra.data.images import IMAGE_SUFFIXES, read_image, resize_image
from tiled_hydra.ensemble import SlotRunner
from tiled_hydra.errors import ConfigError, DataError, TiledHydraError
from tiled_hydra.inference import InferenceEngine, engine_for
from tiled_hydra.postprocess import POSTPROCESS_FILE, Postprocessor, load_postprocessor
from tiled_hydra.rundir import checkpoint_dir
from tiled_hydra.run import make_grid, resolve_device

log = logging.getLogger("tiled_hydra")

OPTIONS = {"run_dir": None, "input": None, "output": None, "maps": "png", "batch_size": 8, "mode": None, "device": None}
COLUMNS = ["path", "score", "normalized_score", "pred_label", "anomalous_area_px", "anomalous_area_fraction", "map", "overlay"]


def parse_args(argv: list[str]) -> DictConfig:
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value; usage: python -m tiled_hydra.predict run_dir=DIR input=DIR_OR_GLOB")
    args = OmegaConf.merge(OmegaConf.create(OPTIONS), OmegaConf.from_dotlist(argv)) if argv else OmegaConf.create(OPTIONS)
    unknown = sorted(set(args) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]}=...; options: {', '.join(OPTIONS)}")
    for key in ("run_dir", "input"):
        if not args[key]:
            raise ConfigError(f"{key}=... is required; usage: python -m tiled_hydra.predict run_dir=DIR input=DIR_OR_GLOB")
    if args.maps not in ("png", "npy"):
        raise ConfigError(f"maps={args.maps}: choose png or npy")
    if int(args.batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {args.batch_size}")
    return args


@dataclass
class TrainedRun:
    cfg: DictConfig
    engine: InferenceEngine
    post: Postprocessor
    fitted_on: str


def load_run(run_dir: Path, mode: str | None, device: str | None) -> TrainedRun:
    """The run's config, slot checkpoints and fitted post-processing; read-only."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise DataError(f"{run_dir} is not a run directory (no .hydra/config.yaml)")
    cfg = OmegaConf.load(config)
    post, fitted_on = load_postprocessor(run_dir / POSTPROCESS_FILE)
    grid = make_grid(cfg.setup)
    torch_device = resolve_device(str(device or cfg.trainer.accelerator))
    checkpoints = checkpoint_dir(cfg, run_dir)  # ensemble.checkpoint_dir when its shards shared one
    if not checkpoints.is_dir():
        raise DataError(f"{run_dir}: no slot checkpoints in {checkpoints}; the run did not train any slot")
    backbone = build_backbone(**OmegaConf.to_container(cfg.backbone, resolve=True), layers=list(cfg.model.net.layers))
    runner = SlotRunner(cfg, grid, backbone, torch_device, checkpoints, {})
    missing = [s for s in range(len(runner.slots)) if not runner.checkpoint_path(s).is_file()]
    if missing:
        raise DataError(f"{run_dir}: {len(missing)} of {len(runner.slots)} slots are not trained (e.g. slot {missing[0]}); finish the run first")
    for slot in range(len(runner.slots)):
        fingerprint = torch.load(runner.checkpoint_path(slot), map_location="cpu", weights_only=True, mmap=True)["fingerprint"]
        if fingerprint != runner.fingerprint:
            raise DataError(f"{runner.checkpoint_path(slot)} was written by another version of tiled_hydra (or its config was edited); retrain")
    engine = engine_for(runner, cfg, keep=True, mode=mode)
    return TrainedRun(cfg, engine, post, fitted_on)


def list_inputs(pattern: str) -> tuple[list[Path], Path]:
    """Files to score (sorted) and the folder their output names are relative to."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        base = path
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        base = Path(os.path.commonpath([str(f.parent) for f in files])) if files else path.parent
    if not files:
        raise DataError(f"input={pattern}: no image files found")
    return files, base


def output_name(path: Path, base: Path) -> str:
    """Unique per input: its path below ``base`` without suffix, folders joined by '__'."""
    return "__".join(path.relative_to(base).with_suffix("").parts)


def heatmap_overlay(image: np.ndarray, normalized: np.ndarray) -> Image.Image:
    """RGB image (h, w, 3) uint8 half-blended with the jet colours of the normalised map."""
    from matplotlib import colormaps

    heat = colormaps["jet"](normalized)[..., :3] * 255
    return Image.fromarray(np.clip(0.5 * image + 0.5 * heat, 0, 255).astype(np.uint8))


def write_outputs(out: Path, name: str, image: Image.Image, raw_map: torch.Tensor, post: Postprocessor, maps_format: str) -> dict:
    """Map and overlay at the image's own size; the row's per-pixel figures."""
    own = F.interpolate(raw_map[None, None], size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0]
    normalized = post.normalize_maps(own).numpy()
    if maps_format == "npy":
        map_file = out / "maps" / f"{name}.npy"
        np.save(map_file, own.numpy().astype(np.float32))
    else:
        map_file = out / "maps" / f"{name}.png"
        Image.fromarray(np.rint(normalized * 65535).astype(np.uint16)).save(map_file)
    overlay_file = out / "overlays" / f"{name}.png"
    heatmap_overlay(np.asarray(image, dtype=np.float32), normalized).save(overlay_file)
    area = int((own >= post.pixel_threshold).sum())
    return {"anomalous_area_px": area, "anomalous_area_fraction": round(area / own.numel(), 6),
            "map": str(map_file), "overlay": str(overlay_file)}


def predict(args: DictConfig) -> int:
    run_dir = Path(args.run_dir).expanduser()
    out = Path(args.output).expanduser() if args.output else Path("predictions") / run_dir.resolve().name
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ConfigError(f"output={out} is inside the run dir, which predict never modifies; choose another folder")
    trained = load_run(run_dir, args.mode, args.device)
    files, base = list_inputs(str(args.input))
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    size = trained.engine.grid.image_size
    log.info("%d files; post-processing fitted on %s", len(files), trained.fitted_on)

    rows, failed = [], []
    start = time.perf_counter()
    progress = tqdm(total=len(files), desc="predict", unit="img", disable=None)
    for first in range(0, len(files), int(args.batch_size)):
        batch_files = files[first : first + int(args.batch_size)]
        readable, pixels = [], []
        for path in batch_files:
            try:
                image = read_image(path, "predict")
            except DataError as err:
                failed.append((str(path), str(err)))
                continue
            readable.append((path, image))
            pixels.append(torch.from_numpy(resize_image(image, size)))
        if readable:
            maps, scores = trained.engine(torch.stack(pixels))
            normalized = trained.post.normalize_scores(scores)
            labels, _ = trained.post.predict(scores)
            for k, (path, image) in enumerate(readable):
                row = {"path": str(path), "score": repr(float(scores[k])), "normalized_score": round(float(normalized[k]), 6),
                       "pred_label": int(labels[k])}
                row |= write_outputs(out, output_name(path, base), image, maps[k], trained.post, str(args.maps))
                rows.append(row)
        progress.update(len(batch_files))
    progress.close()
    seconds = time.perf_counter() - start

    write_csv(out / "predictions.csv", COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
    if failed:
        write_csv(out / "failed.csv", ["path", "cause"], failed)
        for path, cause in failed:
            print(f"tiled_hydra.predict: unreadable: {cause}", file=sys.stderr)
    flagged = sum(row["pred_label"] for row in rows)
    print(f"{len(rows)} images scored, {flagged} flagged anomalous, {len(failed)} unreadable; "
          f"{len(rows) / seconds:.2f} images/s; {out / 'predictions.csv'}")
    return 1 if failed else 0


def write_csv(path: Path, header: list[str], rows: list) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    try:
        return predict(parse_args(sys.argv[1:] if argv is None else argv))
    except TiledHydraError as err:
        print(f"tiled_hydra.predict: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
