"""Score new images with a trained run: ``tiled-hydra-predict run_dir=DIR input=DIR_OR_GLOB``
(``python -m tiled_hydra.predict``; options and their defaults: conf/predict.yaml, or ``--help``).

Writes ``OUTPUT/maps/NAME.{png,npy}``, ``OUTPUT/overlays/NAME.png`` and ``OUTPUT/predictions.csv``
(columns: docs/predict.md, and ``predictions.columns.txt`` beside the CSV), and ``OUTPUT/failed.csv``
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
from pathlib import Path

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from tiled_hydra.cli.common import run_command
from tiled_hydra.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from tiled_hydra.core.postprocess import Postprocessor

log = logging.getLogger("tiled_hydra")
PROG = "tiled_hydra.predict"
USAGE = "usage: tiled-hydra-predict run_dir=RUN_DIR input=DIR_OR_GLOB [output=DIR] [key=value ...]"
COLUMNS = ["path", "score", "normalized_score", "pred_label", "anomalous_area_px", "anomalous_area_fraction", "map", "overlay"]


def check_options(args: DictConfig) -> None:
    if args.maps not in ("png", "npy"):
        raise ConfigError(f"maps={args.maps}: choose png or npy")
    if not isinstance(args.batch_size, int) or isinstance(args.batch_size, bool) or args.batch_size < 1:
        raise ConfigError(f"batch_size={args.batch_size!r}: expected an integer >= 1")
    if args.mode not in (None, "sequential", "resident"):
        raise ConfigError(f"mode={args.mode}: choose sequential or resident")
    if args.device not in (None, "auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"device={args.device}: choose auto, cpu or gpu")
    if args.runtime not in ("torch", "onnx"):
        raise ConfigError(f"runtime={args.runtime}: choose torch or onnx")


def writable_output(out: Path, run_dir: Path) -> None:
    """``out`` created and writable, outside the run dir; checked before any model loads."""
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ConfigError(f"output={out} is inside the run dir, which predict never modifies; choose another folder")
    try:
        for sub in ("maps", "overlays"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output={out} is not writable ({err.strerror or type(err).__name__}); choose another folder") from None


def list_inputs(pattern: str) -> tuple[list[Path], Path]:
    """Files to score (sorted) and the folder their output names are relative to."""
    from tiled_hydra.data.images import IMAGE_SUFFIXES

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


def write_outputs(out: Path, name: str, image: Image.Image, raw_map: torch.Tensor, score: float, post: Postprocessor,
                  maps_format: str, source: str = "") -> dict:
    """Map and overlay (of the image file ``source``) at the image's own size; the row's per-pixel figures."""
    import numpy as np

    from tiled_hydra.reporting.maps import at_size, write_map
    from tiled_hydra.reporting.overlays import draw_overlay, explain, short_path, verdict_of

    own = at_size(raw_map, (image.height, image.width))
    map_file = write_map(out / "maps" / name, own, post, maps_format)
    verdict, heat, prediction = verdict_of(score, post, own)
    overlay_file = draw_overlay(out / "overlays" / f"{name}.png", np.asarray(image), heat, prediction, explain(verdict),
                                f"{short_path(source or name)}  |  thresholds from the run's postprocess.json")
    return {"anomalous_area_px": verdict.area_px, "anomalous_area_fraction": round(verdict.area_px / own.numel(), 6),
            "map": str(map_file), "overlay": str(overlay_file)}


def predict(args: DictConfig) -> int:
    check_options(args)
    run_dir = Path(args.run_dir).expanduser()
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise ConfigError(f"run_dir={run_dir} is not a run directory (no .hydra/config.yaml)")
    # imported after the option checks: torch and matplotlib take seconds to load, which --help and a
    # mistyped option do not need
    import torch

    from tiled_hydra.core.postprocess import POSTPROCESS_FILE, load_postprocessor
    from tiled_hydra.data.images import read_image, resize_image
    from tiled_hydra.reporting.results import write_column_notes

    out = Path(args.output).expanduser() if args.output else Path("predictions") / run_dir.resolve().name
    files, base = list_inputs(str(args.input))
    writable_output(out, run_dir)
    post, fitted_on = load_postprocessor(run_dir / POSTPROCESS_FILE)
    if args.runtime == "onnx":  # the exported graphs (tiled_hydra_runtime) compute the maps and scores
        from tiled_hydra.export.predict import onnx_engine

        engine, size = onnx_engine(run_dir, args.artifact, out)
    else:
        from tiled_hydra.build import open_trained_run  # loads torch and the models: after every cheap check

        _, run = open_trained_run(run_dir, args.mode, args.device)
        engine = run.engine(keep=True)
        size = run.grid.image_size
    log.info("%d files; post-processing fitted on %s", len(files), fitted_on)

    rows, failed = [], []
    start = time.perf_counter()
    from tqdm.auto import tqdm

    from tiled_hydra.core.progress import give_terminal_a_width, on_terminal

    give_terminal_a_width()
    progress = tqdm(total=len(files), desc="predict", unit="img", disable=not on_terminal(), file=sys.stdout)
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
            maps, scores = engine(torch.stack(pixels))
            normalized = post.normalize_scores(scores)
            labels, _ = post.predict(scores)
            for k, (path, image) in enumerate(readable):
                row = {"path": str(path), "score": repr(float(scores[k])), "normalized_score": round(float(normalized[k]), 6),
                       "pred_label": int(labels[k])}
                row |= write_outputs(out, output_name(path, base), image, maps[k], float(scores[k]), post,
                                     str(args.maps), str(path))
                rows.append(row)
        progress.update(len(batch_files))
    progress.close()
    seconds = time.perf_counter() - start

    write_csv(out / "predictions.csv", COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
    write_column_notes(out / "predictions.csv", COLUMNS)
    if failed:
        write_csv(out / "failed.csv", ["path", "cause"], failed)
        for path, cause in failed:
            print(f"tiled_hydra.cli.predict: unreadable: {cause}", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run_command(PROG, "predict", USAGE, predict, argv)


if __name__ == "__main__":
    main()
