"""
Deployment outside PyTorch: `dasheng-export` writes a Dasheng model as ONNX (fp32 and dynamic int8) and as a
`torch.export` program, with a numpy front end and an ONNX Runtime class that needs no torch.

Modules:
- `exporters.py`: the export wrapper (tuple outputs), `torch.export` with dynamic batch and frames, ONNX export with
  metadata and external data, dynamic int8 quantisation.
- `export.py`: the `dasheng-export` command line (arguments parsed before torch is imported; an atomic output folder).
- `runtime.py`: `DashengOnnxEncoder`, an export folder run with ONNX Runtime, numpy in and out, and
  `DashengNumpyFrontEnd`, the log-mel recipe in numpy; self-contained (copied into each export folder as
  `dasheng_onnx.py`).

May import: the Hub code files (configuration, feature extraction, modeling), `cli`, torch, numpy, onnx,
onnxruntime, onnxscript; `runtime.py` imports numpy and onnxruntime only (no torch, nothing of this package).
"""
