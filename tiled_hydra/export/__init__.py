"""Deploy a trained tiled ensemble without the training stack: ``python -m tiled_hydra.export run_dir=RUN``
writes its slot graphs and a manifest (:mod:`tiled_hydra.export.onnx`), which
:mod:`tiled_hydra_runtime` scores images with (onnxruntime, numpy and Pillow only)."""
