"""Export a finished run's slots as ONNX graphs plus a manifest (:mod:`tiled_hydra_runtime.manifest`).

Graphs (batch dimension free, every other size fixed by the run's setup):

- models that take backbone features (PaDiM, PaDiM-IPCA, PatchCore, FastFlow, Reverse Distillation):
  ``backbone.onnx`` once (tiles in [0, 1] -> the stages; with ``inference.features=whole_image``
  the whole zero-padded image -> the stages), and per slot ``slot_NNN.onnx`` (stages -> tile maps,
  tile scores). The backbone is stored once, not once per slot, and computes what the engine's
  backbone computes for the same pixels.
- models that take pixels (EfficientAD): per slot ``slot_NNN.onnx`` (tiles -> maps, scores).

DDAD is refused: its map is a sampling loop of U-Net passes whose noise is drawn per call.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from tiled_hydra import __version__
from tiled_hydra.build import open_trained_run
from tiled_hydra.core.postprocess import POSTPROCESS_FILE, load_postprocessor
from tiled_hydra.errors import ConfigError, DataError
from tiled_hydra.export.heads import head_for, traceable
from tiled_hydra_runtime.manifest import CALIBRATION_FILE, FORMAT_VERSION, MANIFEST_FILE, file_sha256

log = logging.getLogger("tiled_hydra")

NOT_EXPORTABLE = {
    "ddad": "its anomaly map is a sampling loop of U-Net passes with noise drawn per call, which a fixed graph "
            "does not reproduce; score it with python -m tiled_hydra.predict",
}
OPSET = 17
FORMATS = ("onnx", "openvino")
#: Largest map difference (relative to the map's range on the check input) the export accepts
#: between a graph in onnxruntime and the torch module it was traced from.
CHECK_TOLERANCE = 1e-3


def check_output(output: Path, run_dir: Path) -> None:
    """``output`` empty, new or a previous export; never inside the run dir."""
    if output.resolve() == run_dir.resolve() or run_dir.resolve() in output.resolve().parents:
        raise ConfigError(f"output={output} is inside the run dir, which export never modifies; choose another folder")
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST_FILE).is_file())):
        raise ConfigError(f"output={output} exists and is not an export; choose a new or empty folder")


def to_onnx(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str],
            output_names: list[str], opset: int) -> bytes:
    """The traced graph of ``module`` with a free batch dimension on every input and output."""
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with warnings.catch_warnings(), traceable(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python numbers taken from shapes: the sizes are fixed
        torch.onnx.export(module, inputs, buffer, dynamo=False, input_names=input_names, output_names=output_names,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    return buffer.getvalue()


def check_graph(graph: bytes, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], what: str,
                tolerance: float = CHECK_TOLERANCE) -> float:
    """Run the graph once in onnxruntime on ``inputs``; its first output must match ``module``'s."""
    import onnxruntime as ort

    runner = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    names = [i.name for i in runner.get_inputs()]
    ours = runner.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]
    with traceable(), torch.no_grad():
        theirs = module(*inputs)
    theirs = (theirs[0] if isinstance(theirs, (tuple, list)) else theirs).float().numpy()
    span = max(float(theirs.max() - theirs.min()), 1e-12)
    difference = float(np.abs(ours - theirs).max()) / span
    if not difference <= tolerance:
        raise DataError(f"{what}: the exported graph differs from the model by {difference:.2e} of the map's range "
                        f"(more than {tolerance:g}); this model or backbone does not export faithfully")
    return difference


def export_run(run_dir: Path, output: Path, fmt: str = "onnx", opset: int = OPSET, check: bool = True) -> Path:
    """Write the graphs and the manifest of the finished run in ``run_dir`` to ``output``; returns the manifest."""
    run_dir, output = Path(run_dir).expanduser(), Path(output).expanduser()
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt}: choose {' or '.join(FORMATS)}")
    check_output(output, run_dir)
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"run_dir={run_dir} is not a run directory (no .hydra/config.yaml)")
    name = str(OmegaConf.load(config).model.name)
    if name in NOT_EXPORTABLE:  # before any model loads
        raise ConfigError(f"model {name} cannot be exported: {NOT_EXPORTABLE[name]}")
    post, fitted_on = load_postprocessor(run_dir / POSTPROCESS_FILE)  # a run that finished its evaluation
    cfg, run = open_trained_run(run_dir, device="cpu")  # every slot trained by this configuration and version
    if fmt == "openvino":
        from tiled_hydra.export.openvino import require_openvino

        require_openvino()
    output.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST_FILE).unlink(missing_ok=True)  # written last: an interrupted export has none
    grid, features, tile = run.grid, run.features, tuple(run.grid.tile_size)
    takes_features = run.store.load(0).backbone_features
    written: list[str] = []

    def write(file: str, graph: bytes) -> str:
        (output / file).write_bytes(graph)
        if fmt == "openvino":
            from tiled_hydra.export.openvino import convert_graph

            file = convert_graph(output / file)
        written.append(file)
        return file

    sample = torch.rand(2, 3, *tile, generator=torch.Generator().manual_seed(0))  # tiles in [0, 1]
    backbone_file = None
    if takes_features:
        backbone_input = sample
        if features.whole_image:
            backbone_input = torch.rand(1, 3, *grid.padded_size, generator=torch.Generator().manual_seed(0))
        input_names = [f"stage_{k}" for k in range(len(features.reductions))]
        graph = to_onnx(run.backbone, (backbone_input,), ["pixels"], input_names, opset)
        if check:
            check_graph(graph, run.backbone, (backbone_input,), "backbone")
        backbone_file = write("backbone.onnx", graph)
        with torch.no_grad():
            head_inputs = tuple(run.backbone(sample))
    else:
        input_names, head_inputs = ["tiles"], (sample,)

    slots, positions = [], {}
    for slot, tiles in enumerate(run.store.tiles):
        model = run.store.load(slot)
        head = head_for(model, tile, head_inputs)
        graph = to_onnx(head, head_inputs, input_names, ["maps", "scores"], opset)
        if check:
            check_graph(graph, head, head_inputs, f"slot {slot}", getattr(head, "check_tolerance", CHECK_TOLERANCE))
        file = write(f"slot_{slot:03d}.onnx", graph)
        calibration = getattr(model, "calibration", None)
        if calibration is not None and calibration.position_median is not None:
            positions[f"slot_{slot:03d}_median"] = calibration.position_median.float().numpy()
            positions[f"slot_{slot:03d}_spread"] = calibration.position_spread.float().numpy()
        slots.append({"file": file, "tiles": list(tiles), "calibration": None if calibration is None else calibration.summary()})
        log.info("slot %d of %d: %s, %.1f MiB", slot + 1, len(run.store), file, len(graph) / 2**20)
        del model, head, graph
    if positions:
        with (output / CALIBRATION_FILE).open("wb") as f:
            np.savez(f, **positions)
        written.append(CALIBRATION_FILE)
    if fmt == "openvino":  # each IR is an .xml (the graph) and a .bin (the weights)
        written += [f.replace(".xml", ".bin") for f in written if f.endswith(".xml")]

    merge = run.merge
    manifest = {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "tiled_hydra_version": __version__,
        "model": name,
        "backbone": str(cfg.backbone.name),
        "setup": str(cfg.setup.name),
        "slot_fingerprint": run.store.fingerprint,
        "exported_from": str(run_dir.resolve()),
        "input": {"image_size": list(grid.image_size), "resize": "PIL bilinear", "channels": "RGB", "scale": 1 / 255,
                  "mean": list(cfg.backbone.mean), "std": list(cfg.backbone.std),
                  "normalisation": "inside the graphs: their inputs are pixels / 255"},
        "grid": {"image_size": list(grid.image_size), "tile_size": list(grid.tile_size), "stride": list(grid.stride)},
        "features": features.mode if takes_features else "pixels",
        "reductions": list(features.reductions) if takes_features else [],
        "graphs": {"backbone": backbone_file, "slots": slots},
        "merge": {"score": merge.score, "window": merge.window, "calibration": merge.calibration,
                  "seam_smoothing": {"enabled": merge.seam_smoothing, "sigma": merge.sigma,
                                     "width_fraction": merge.width_fraction}},
        "postprocess": {"postprocessor": asdict(post), "fitted_on": fitted_on},
        "batch_size": int(cfg.model.batch_size),
        "files": {f: file_sha256(output / f) for f in written},
    }
    path = output / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return path
