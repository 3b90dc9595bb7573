"""Portable decoding of momctl models (installed as momctl.export): the recurrent step, ONNX export and runtime."""
# KV-cache positions of attention layers in an exported graph by default (prompt + generated tokens); here, not in
# onnx_export.py, so that the CLI names it without importing the exporter (onnx and onnxscript take ~2 s to import).
DEFAULT_MAX_LENGTH = 4096
# An ONNX bundle manifest's "format": here too, so that the checkpoint reader can tell a bundle apart cheaply.
BUNDLE_FORMAT = "momctl-onnx-bundle"
