"""Multi-codebook quantization of cached features (faiss trains, torch encodes), convert, decode.

``create_quantizer``-style entry: ``QuantizerSpec.parse("opq:M=48")`` then ``fit`` /
``encode``; ``quantize_store`` converts a store; ``CodeDecoder`` decodes on the device.
"""
from .convert import convert_shard, quantize_store, train_quantizer
from .methods import METHODS, QuantizeError, QuantizerSpec, encode, faiss_decode, faiss_encode, fit
from .encoder import TorchEncoder
from .sample import SampleSpec

__all__ = ["METHODS", "QuantizeError", "QuantizerSpec", "SampleSpec", "TorchEncoder", "convert_shard", "encode",
           "faiss_decode", "faiss_encode", "fit", "quantize_store", "train_quantizer"]
