"""graphattn.runtime: run exported graphs with onnxruntime (CPU or CUDA) and generate text.

Needs only onnxruntime, numpy, tokenizers and jinja2 — never the builder — so it also shows
how any app drives our graphs.
"""

from graphattn.runtime.cache_layout import CacheTensor
from graphattn.runtime.config import DecoderConfig, ModelLoadError
from graphattn.runtime.generate import Generation, Generator, Timings
from graphattn.runtime.kv_cache import BoundCache, ContextLengthError, PlainCache
from graphattn.runtime.sampling import SamplingOptions
from graphattn.runtime.session import ModelSession, cuda_available
from graphattn.runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError

__all__ = [
    "BoundCache",
    "CacheTensor",
    "ContextLengthError",
    "DecoderConfig",
    "Generation",
    "Generator",
    "ModelLoadError",
    "ModelSession",
    "PlainCache",
    "SamplingOptions",
    "StreamDecoder",
    "Timings",
    "Tokenizer",
    "TokenizerError",
    "cuda_available",
]
