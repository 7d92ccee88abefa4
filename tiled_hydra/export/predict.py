"""``python -m tiled_hydra.predict ... runtime=onnx``: the exported graphs in place of the torch engine.

predict keeps everything else (reading, resizing, thresholds, maps, overlays, CSV); only the
maps and scores come from :mod:`tiled_hydra_runtime`. ``artifact=DIR`` names an export of the
run; without it the run is exported to OUTPUT/export once and reused by later calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tiled_hydra.errors import ConfigError, DataError
from tiled_hydra.rundir import slot_fingerprint

log = logging.getLogger("tiled_hydra")


def onnx_engine(run_dir: Path, artifact: str | None, output: Path, threads: int = 0
                ) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], tuple[int, int]]:
    """A callable like the engine's (uint8 images -> raw maps, scores) over the run's exported graphs,
    and the image size it takes."""
    try:
        import tiled_hydra_runtime
        from tiled_hydra_runtime import RuntimeFailure, UsageError
        from tiled_hydra_runtime.manifest import MANIFEST_FILE
    except ImportError:  # onnxruntime missing
        raise ConfigError("runtime=onnx needs onnxruntime: pip install 'tiled_hydra[export]'") from None
    expected = slot_fingerprint(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    folder = Path(artifact).expanduser() if artifact else output / "export"
    if artifact is None and not (folder / MANIFEST_FILE).is_file():
        from tiled_hydra.export.onnx import export_run

        log.info("exporting the run to %s (reused by later calls with the same output)", folder)
        export_run(run_dir, folder)
    try:
        detector = tiled_hydra_runtime.load(folder, threads=threads)
    except UsageError as err:
        raise ConfigError(str(err)) from None
    except RuntimeFailure as err:
        raise DataError(str(err)) from None
    if detector.manifest.get("slot_fingerprint") != expected:
        raise ConfigError(f"artifact={folder} was exported from another run or configuration than run_dir={run_dir} "
                          f"(slot fingerprint {detector.manifest.get('slot_fingerprint')} != {expected}); export this run")

    def engine(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = detector.predict(images.numpy())
        return torch.from_numpy(maps), torch.from_numpy(scores)

    return engine, detector.image_size
