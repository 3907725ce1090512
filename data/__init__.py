"""Data: everything that turns corpus bytes into pixels, and decides who reads what.

``corpus`` (what a corpus is: webdataset tars or an image folder, local or an fsspec URL; how to
read it back), ``walk`` (the one walk over a shard: its samples, the key rules, alignment with a
store shard's keys, the skip/fail handlers), ``pixels`` (decoding with the bad-input policy, the
K views, crops: one stage), ``partition`` (rank x world x worker splits), ``corpus_keys`` (the
corpus side of ``verify --data``), ``demo_corpus`` (the embedded real images).
"""
