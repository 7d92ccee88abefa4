"""Graph runners: onnxruntime (format onnx), or OpenVINO's runtime for format openvino when installed.

A runner is called with {input name: float32 array} and returns the outputs in the graph's order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiled_hydra_runtime.errors import RuntimeFailure, UsageError


class OnnxGraph:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: its warnings are not the user's business
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for a damaged graph
            raise RuntimeFailure(f"{path} cannot be loaded by onnxruntime ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class OpenVinoGraph:
    def __init__(self, path: Path, threads: int):
        try:
            import openvino as ov
        except ImportError:
            raise UsageError("this artifact is in OpenVINO format: pip install openvino") from None
        # float32 throughout: on CPUs with bfloat16 units OpenVINO's default would run the graphs in bfloat16
        config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.model = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.model.create_infer_request()
        self.inputs = [i.get_any_name() for i in self.model.inputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        return [np.asarray(results[out]) for out in self.model.outputs]


def open_graph(path: Path, fmt: str, threads: int):
    return (OnnxGraph if fmt == "onnx" else OpenVinoGraph)(path, threads)
