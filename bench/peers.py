"""The loaders users pick, as ``bench formats`` writes and reads them: Mosaic ``streaming`` (MDS)
and LitData, each with its own writer and its own ``StreamingDataset``, at the settings their
docs recommend. Imported only when installed (``pip install 'kdcache[peers]'``)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kdcache.store import Store, feature_path
from kdcache.store.meta import PIXELS_JPEG

from .harness import files_under

if TYPE_CHECKING:
    from .formats import Features


def write_mds(feats: Features, root: str, source: Store | None = None) -> list[str]:
    """Mosaic streaming's MDS: one sample per row, fixed-shape ndarray columns (no per-sample header)."""
    from streaming import MDSWriter
    cls, patch = feature_path(feats.teacher, "cls"), feature_path(feats.teacher, "patch")
    k, t = feats.meta.views, feats.meta.teachers[feats.teacher]
    columns = {"key": "str", "cls": f"ndarray:float16:{k},{t.dim}", "patch": f"ndarray:float16:{k},{t.tokens},{t.dim}"}
    pixels = any(PIXELS_JPEG in a for a in feats.shards.values())
    if pixels:  # every view's JPEG, one bytes column each
        columns.update({f"jpeg{v}": "bytes" for v in range(k)})
    with MDSWriter(out=root, columns=columns, compression=None) as w:
        for arrays in feats.shards.values():
            for i, key in enumerate(arrays["keys"].tolist()):
                row = {"key": key, "cls": arrays[cls][i], "patch": arrays[patch][i]}
                if pixels:
                    row.update({f"jpeg{v}": arrays[PIXELS_JPEG][i][v] for v in range(k)})
                w.write(row)
    return files_under(root)


def _litdata_sample(item: dict) -> dict:
    """LitData's optimize maps every input through a function (in a spawned worker: module level)."""
    return item


def write_litdata(feats: Features, root: str, source: Store | None = None) -> list[str]:
    """LitData's optimiser, one worker, 64 MB chunks (its recommendation for streaming reads)."""
    import contextlib
    import io

    import litdata
    cls, patch = feature_path(feats.teacher, "cls"), feature_path(feats.teacher, "patch")
    items = [{"key": key, "cls": arrays[cls][i], "patch": arrays[patch][i],
              **({f"jpeg{v}": jpegs for v, jpegs in enumerate(arrays[PIXELS_JPEG][i])} if PIXELS_JPEG in arrays else {})}
             for arrays in feats.shards.values() for i, key in enumerate(arrays["keys"].tolist())]
    import multiprocessing
    before = multiprocessing.get_start_method(allow_none=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress and adverts to stdout
            litdata.optimize(fn=_litdata_sample, inputs=items, output_dir=os.path.abspath(root), chunk_bytes="64MB",
                             num_workers=1, mode="overwrite")
    finally:  # optimize sets the process-wide start method to spawn: every later DataLoader would spawn
        multiprocessing.set_start_method(before, force=True)
    return files_under(root)


PEERS = {"mosaic streaming (MDS)": ("mds", "streaming", write_mds), "litdata": ("litdata", "litdata", write_litdata)}


def peers_installed() -> dict[str, bool]:
    import importlib.util
    return {name: importlib.util.find_spec(module) is not None for name, (_, module, _) in PEERS.items()}



def mds_dataset(root: str, batch_size: int):
    def make():
        from streaming import StreamingDataset
        return StreamingDataset(local=root, remote=None, shuffle=True, batch_size=batch_size)
    return make


def litdata_dataset(root: str):
    def make():
        import litdata
        return litdata.StreamingDataset(os.path.abspath(root), shuffle=True)
    return make


def litdata_loader(batch_size: int, workers: int, collate=None):
    def make(ds):
        import litdata
        return litdata.StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers,
                                           **({"collate_fn": collate} if collate else {}))
    return make
