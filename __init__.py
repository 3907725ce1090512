"""kdcache: cache teacher features once, distil students from the cache.

The pipeline is the package layout: ``extract`` (teachers -> store), ``store`` (the sharded
Zarr format), ``train`` (students from the store), ``eval`` (reports and benchmarks).
"""
__version__ = "0.2.0"
