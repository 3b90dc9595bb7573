"""Portable decoding of momctl models (installed as momctl.export): the recurrent step, ONNX export and runtime."""
