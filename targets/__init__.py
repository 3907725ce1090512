"""Targets: between the store and the trainer.

``decoding`` turns stored bytes (fp16, bf16 bits, float32, uint8 codes) into normalised float
targets on the training device; ``normalize`` builds the normalisers from statistics;
``stats`` is the one statistics module (producers write them into stores, readers check them,
online runs compute them from live teachers); ``sample`` draws the seeded token sample that
statistics and quantizer training read. Nothing here imports faiss or does run-directory I/O:
callers hand statistics in and keep them where they belong.
"""
