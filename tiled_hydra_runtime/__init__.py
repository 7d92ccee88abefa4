"""Score images with an exported tiled ensemble using onnxruntime, numpy and Pillow only: no torch,
Lightning, Hydra, timm or faiss (export: ``python -m tiled_hydra.export run_dir=RUN``).

    import tiled_hydra_runtime
    detector = tiled_hydra_runtime.load("exports/my_run")
    for result in detector.score_files(["part_001.png"]):
        print(result.path, result.score, result.label)

Command line: ``python -m tiled_hydra_runtime artifact=DIR input=DIR_OR_GLOB [output=DIR]``.
"""

from tiled_hydra_runtime.detector import Detector, Scored, load
from tiled_hydra_runtime.errors import RuntimeFailure, UsageError

__all__ = ["Detector", "RuntimeFailure", "Scored", "UsageError", "load"]
