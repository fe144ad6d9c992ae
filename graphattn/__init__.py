"""graphattn: attention models as explicit, verifiable ONNX graphs."""

__version__ = "0.1.0"
