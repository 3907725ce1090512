"""Data: corpora (webdataset tars, image folders, fsspec URLs), decoding with the bad-input
policy, the K stored views, the one walk over a corpus shard in step with a store shard
(``walk``), and who reads which shard (``partition``). Extraction, verify, training and eval
all read corpora through here, so they can never disagree about which samples exist."""
from .corpus import Corpus, CorpusError, CorpusShard, RawSample, ReadOptions, resolve_corpus
from .decode import BadImage, DecodeOptions, decode_image, decode_sample
from .walk import AlignError, Skip, align, screen, stored_samples

__all__ = ["AlignError", "BadImage", "Corpus", "CorpusError", "CorpusShard", "DecodeOptions", "RawSample",
           "ReadOptions", "Skip", "align", "decode_image", "decode_sample", "resolve_corpus", "screen", "stored_samples"]
