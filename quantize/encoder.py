"""Features -> codes in torch, on the device that holds the features.

Every method, as stored (``Codebooks``), encodes here; faiss only trains the codebooks (and is
the reference these encoders are tested against, ``methods.faiss_encode``):

- product codebooks (pq, opq, pca, sq8, sq4): one matmul applies the rotation, then the nearest
  of 256 entries per subspace by one batched matmul: argmin_k |c_k|^2 - 2 y.c_k (|y|^2 is the
  same for every k). The same decision as faiss's ProductQuantizer.
- additive codebooks (rq): beam search with faiss's semantics. Step c extends each of the (up to)
  B partial encodings by each of the 256 entries of codebook c; the B candidates of least
  squared residual survive; the code is the best survivor after the last codebook. Residuals are
  kept explicitly, so a step is one (N*B, D) x (D, 256) matmul plus a top-k: on a GPU the whole
  encoder is a few kernels per codebook, on a CPU it is BLAS-bound. (faiss's alternative, a table
  of codebook cross-products, needs C^2/2 x 256^2 floats: 3.3 GB at C=159.)
- gain-shape (``norm=1``): the last code is the nearest of 256 log-spaced norm levels, the
  codebooks code x / |x|.

Ties (two entries at the same distance, to float rounding) may resolve differently than in
faiss; the tests bound how often (never for product codes on their data; < 1% for rq).
"""
from __future__ import annotations

import numpy as np
import torch

from kdcache.store.codes import ADDITIVE, Codebooks

BATCH_TOKENS = 8192  # tokens per encoder step: bounds the residual buffer (N x beam x D floats)


class TorchEncoder:
    """``TorchEncoder(cb, device, beam=...)(x)``: (N, D) float tensor or array -> (N, M) uint8 tensor."""

    def __init__(self, cb: Codebooks, device: str | torch.device = "cpu", *, beam: int | None = None):
        self.cb = cb
        self.device = torch.device(device)
        self.additive = cb.kind == ADDITIVE
        self.beam = int(beam or cb.attrs.get("beam", 8))
        self.c, self.dim = cb.n_codebooks, cb.dim

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

        self.mean = t(cb.mean)
        rot = np.asarray(cb.rotation, dtype=np.float32)
        self.rotation_t = None if np.array_equal(rot, np.eye(cb.dim, dtype=np.float32)) else t(rot.T)
        self.books = t(cb.codebooks)  # (C, 256, sub) or (C, 256, D)
        self.book_norms = (self.books * self.books).sum(-1)  # (C, 256)
        if cb.norms is not None:
            levels = cb.norms.astype(np.float32)
            self.log_lo, self.log_hi = float(np.log(levels[0])), float(np.log(levels[-1]))
            self.level0 = float(levels[0])

    @torch.no_grad()
    def __call__(self, x) -> torch.Tensor:
        x = torch.as_tensor(x).to(self.device, torch.float32)
        if x.shape[-1] != self.dim:
            from .methods import QuantizeError
            raise QuantizeError(f"features have dim {x.shape[-1]}, quantizer {self.cb.method} expects {self.dim}")
        x = x.reshape(-1, self.dim)
        out = torch.empty((x.shape[0], self.cb.m), dtype=torch.uint8, device=self.device)
        for s in range(0, x.shape[0], BATCH_TOKENS):
            out[s:s + BATCH_TOKENS] = self._encode(x[s:s + BATCH_TOKENS])
        return out

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        norm_code = None
        if self.cb.norms is not None:
            lengths = torch.linalg.vector_norm(x, dim=1)
            t = (torch.log(torch.clamp(lengths, min=self.level0)) - self.log_lo) / (self.log_hi - self.log_lo) * 255
            norm_code = torch.clamp(torch.round(t), 0, 255).to(torch.uint8)
            x = x / torch.clamp(lengths, min=1e-12)[:, None]
        y = x - self.mean
        if self.rotation_t is not None:
            y = y @ self.rotation_t
        codes = self._beam_search(y) if self.additive else self._nearest(y)
        return codes if norm_code is None else torch.cat([codes, norm_code[:, None]], 1)

    def _nearest(self, y: torch.Tensor) -> torch.Tensor:
        """Per subspace: the two least |c_k|^2 - 2 y_s . c_k by one batched matmul, then the
        nearer of those two by direct differences. The expanded form loses precision when |y| is
        large and the residual small (sq8's fine grids); the direct re-ranking decides as faiss's
        direct distances do (equal distances: the lower index)."""
        n = y.shape[0]
        ys = y.reshape(n, self.c, -1).transpose(0, 1)  # (C, N, sub)
        dots = torch.baddbmm(self.book_norms[:, None, :], ys, self.books.transpose(1, 2), alpha=-2)  # (C, N, 256)
        cand = torch.topk(dots, 2, dim=-1, largest=False, sorted=True).indices  # (C, N, 2)
        entries = torch.gather(self.books, 1, cand.reshape(self.c, -1, 1).expand(-1, -1, self.books.shape[2]))
        d = ((ys.unsqueeze(2) - entries.view(self.c, n, 2, -1)) ** 2).sum(-1)  # (C, N, 2)
        second = (d[..., 1] < d[..., 0]) | ((d[..., 1] == d[..., 0]) & (cand[..., 1] < cand[..., 0]))
        return torch.where(second, cand[..., 1], cand[..., 0]).T.to(torch.uint8)

    def _beam_search(self, y: torch.Tensor) -> torch.Tensor:
        n, d = y.shape
        resid = y[:, None, :]  # (N, B, D): residual of each partial encoding
        codes = torch.empty((n, 1, 0), dtype=torch.int64, device=y.device)
        rows = torch.arange(n, device=y.device)[:, None]
        for c in range(self.c):
            b = resid.shape[1]
            dist = (resid * resid).sum(-1)  # (N, B) squared residuals, from the residuals themselves
            cand = torch.addmm(self.book_norms[c], resid.reshape(n * b, d), self.books[c].T, alpha=-2)
            cand = cand.view(n, b, 256) + dist[..., None]  # |r - e|^2 = |r|^2 - 2 r.e + |e|^2
            keep = min(self.beam, b * 256)
            _, best = torch.topk(cand.view(n, b * 256), keep, dim=1, largest=False, sorted=True)
            parent, entry = best // 256, best % 256
            resid = resid[rows, parent] - self.books[c][entry]
            codes = torch.cat([codes[rows, parent], entry[..., None]], 2)
        return codes[:, 0].to(torch.uint8)  # sorted: survivor 0 has the least residual
