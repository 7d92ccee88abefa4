"""``manifest.json``: what an exported run is and how to score with it; the one definition both the
exporter (tiled_hydra.export) and the runtime read.

Keys (format 1):

``format_version``, ``format`` (onnx | openvino), ``tiled_hydra_version`` (that wrote it), ``model``,
``setup``, ``slot_fingerprint`` (of the run's slots), ``exported_from`` (the run dir)
``input``: ``image_size`` [H, W], ``resize`` (PIL bilinear), ``channels`` (RGB), ``scale`` (1/255),
  ``mean``/``std`` (ImageNet normalisation, applied inside the graphs)
``grid``: ``image_size``, ``tile_size``, ``stride`` ([H, W] each)
``features``: per_tile | whole_image | pixels (the slot graphs take tiles' pixels), ``reductions``
  (the backbone stages' strides)
``graphs``: ``backbone`` (file or null), ``slots``: one per slot: ``file``, ``tiles``, ``calibration``
  (the slot's numbers; per-position arrays in ``calibration.npz`` as ``slot_NNN_median/_spread``)
``merge``: ``score``, ``seam_smoothing`` {enabled, sigma, width_fraction}, ``window``, ``calibration``
``postprocess``: the run's postprocess.json (thresholds and normalisation fitted on validation) and
  ``fitted_on``
``batch_size``: tiles per graph call (the run's model.batch_size)
``files``: {file name: sha256} of every other file of the artifact
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tiled_hydra_runtime.errors import RuntimeFailure, UsageError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
FORMATS = ("onnx", "openvino")
CALIBRATION_FILE = "calibration.npz"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(artifact: Path, verify: bool = True) -> dict:
    """The manifest of an exported run; every file it lists checked against its sha256 (``verify``)."""
    artifact = Path(artifact).expanduser()
    path = artifact / MANIFEST_FILE
    if not path.is_file():
        raise UsageError(f"{artifact} is not an exported run (no {MANIFEST_FILE}); export one with "
                         "python -m tiled_hydra.export run_dir=RUN")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RuntimeFailure(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UsageError(f"{path}: artifact format {version!r}; this runtime reads format {FORMAT_VERSION} "
                         "(export the run again with this version of tiled_hydra)")
    if manifest.get("format") not in FORMATS:
        raise UsageError(f"{path}: unknown graph format {manifest.get('format')!r}")
    if verify:
        for name, expected in manifest["files"].items():
            file = artifact / name
            if not file.is_file():
                raise RuntimeFailure(f"{artifact}: {name} is missing; export the run again")
            if file_sha256(file) != expected:
                raise RuntimeFailure(f"{artifact}: {name} does not match its sha256 in {MANIFEST_FILE} "
                                     "(modified or truncated); export the run again")
    return manifest
