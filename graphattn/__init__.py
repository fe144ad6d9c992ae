"""graphattn: attention models as explicit, verifiable ONNX graphs."""

__version__ = "0.1.0"


def export(checkpoint, out_dir, **options):
    """Export a checkpoint to ``out_dir``; see :func:`graphattn.exporters.export.export`."""
    from graphattn.exporters.export import export as _export

    return _export(checkpoint, out_dir, **options)
