"""Serving the compressed model outside PyTorch: ONNX export onto ONNX Runtime's integer kernels. No Lightning.

``onnx`` / ``onnxruntime`` are optional (``pip install 'lightning-compress[onnx]'``) and imported only when
:func:`export_onnx` runs.
"""

from lightning_compress.serving.onnx import INTEGER_OPS, LayerExport, OnnxExportReport, OutputCheckError, export_onnx

__all__ = ["INTEGER_OPS", "LayerExport", "OnnxExportReport", "OutputCheckError", "export_onnx"]
