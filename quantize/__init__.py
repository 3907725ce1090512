"""Multi-codebook quantization of cached features: faiss trains, torch encodes.

``quantizer_spec`` (``METHOD[:M=..]`` as the command line names a quantizer; light), ``methods`` (faiss
training by name, and faiss's encoder as the tested reference), ``encoder`` (torch: features ->
codes on any device), ``refine`` (joint least-squares rq codebooks), ``convert_store`` (a store's
floats -> codes, across ranks), ``reconstruction`` (held-out fidelity figures). Decoding codes on
the training device is ``targets.decoding``'s job: training never imports faiss.
"""
