"""Export to runtimes: ONNX graphs built straight from the NumPy weights."""

from .onnx import DEFAULT_OPSET, export_onnx, to_onnx

__all__ = ["DEFAULT_OPSET", "export_onnx", "to_onnx"]
