"""Benchmarks: is the pipeline fast, and the studies that decide between its options.

Every ``kdcache bench`` command lives here: the measurement ``harness`` (warm-up, repeated and
interleaved sides, medians with spreads, ratios round by round), the timed benches (extraction,
training, loading, quantizers, codecs, formats), the studies (quality of cached vs online
students, the multi-teacher options) and the feature builders they use (MiniLM text tokens,
EfficientNet-Lite0 image patches). Their settings and defaults are in ``options``.
"""
