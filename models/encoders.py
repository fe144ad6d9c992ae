"""The encoder registry (separate from the decoders' in ``graphattn.models``): which
``config.json`` is an encoder, and its :class:`~graphattn.spec.Architecture`, whose
``config_from_hf`` returns an :class:`~graphattn.encoder_spec.EncoderConfig`."""

from collections.abc import Mapping

from graphattn.models import bert, modernbert
from graphattn.spec import Architecture

ENCODERS: dict[str, Architecture] = {
    "bert": bert.ARCHITECTURE,
    "modernbert": modernbert.ARCHITECTURE,
}


def encoder_architecture(config: Mapping[str, object]) -> Architecture | None:
    """The encoder architecture for an HF ``config.json`` (by ``model_type``, else by its
    ``architectures``), or None when it is not an encoder we build."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in ENCODERS:
        return ENCODERS[model_type]
    architectures = config.get("architectures") or []
    if isinstance(architectures, list):
        for architecture in ENCODERS.values():
            if any(name in architecture.hf_architectures for name in architectures):
                return architecture
    return None
