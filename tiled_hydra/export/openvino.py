"""OpenVINO IR as a second format: each ONNX graph converted by OpenVINO's own converter to an
``.xml`` (the graph) and ``.bin`` (its weights); the runtime then runs them with OpenVINO's
runtime instead of onnxruntime (``pip install openvino``)."""

from __future__ import annotations

from pathlib import Path

from tiled_hydra.errors import ConfigError


def require_openvino() -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise ConfigError("format=openvino needs the openvino package: pip install openvino") from None


def convert_graph(onnx_path: Path) -> str:
    """``NAME.onnx`` -> ``NAME.xml`` + ``NAME.bin`` beside it (weights kept in float32); the ONNX file
    is removed. Returns the .xml file's name."""
    import openvino as ov

    xml = onnx_path.with_suffix(".xml")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    onnx_path.unlink()
    return xml.name
