"""Extraction: corpus -> decoded views -> teachers -> store shards.

``options`` (``ExtractOptions``: every setting, validated, with its default), ``run`` (the
extraction: plan, one pass, resume; the ``--quantize`` sequence written out), ``batches`` (the
DataLoader side: the walk and the pixel stage into ``ViewBatch``es), ``quantized`` (the pieces
of ``--quantize``), ``writer`` (the background thread that owns the shard writers).
"""
