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
  encoder is a few kernels per codebook, on a CPU it runs at ~90% of the matmul's speed. (faiss's alternative, a table
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

# tokens per encoder step: on a CPU small blocks stay in cache (256: 2x the speed of 8192 for rq,
# 1.4x for pq, measured); a GPU wants large ones. Bounds the residual buffer (N x beam x D floats).
BATCH_TOKENS = {"cpu": 256, "cuda": 16384}


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
            from .quantizer_spec import QuantizeError
            raise QuantizeError(f"features have dim {x.shape[-1]}, quantizer {self.cb.method} expects {self.dim}")
        x = x.reshape(-1, self.dim)
        out = torch.empty((x.shape[0], self.cb.m), dtype=torch.uint8, device=self.device)
        step = BATCH_TOKENS.get(self.device.type, 4096)
        for s in range(0, x.shape[0], step):
            out[s:s + step] = self._encode(x[s:s + step])
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
        resid = y  # (N * B, D): the residual of each partial encoding, B per token
        dist = (y * y).sum(1, keepdim=True)  # (N, B): its squared norm
        codes = torch.zeros((n, 1, self.c), dtype=torch.int64, device=y.device)
        base = torch.arange(n, device=y.device)[:, None]
        b = 1
        for c in range(self.c):
            # |r - e|^2 = |r|^2 - 2 r.e + |e|^2 for every survivor r and entry e: one matmul
            cand = torch.addmm(self.book_norms[c], resid, self.books[c].T, alpha=-2).view(n, b, 256)
            cand += dist.unsqueeze(2)
            keep = min(self.beam, b * 256)
            dist, best = torch.topk(cand.view(n, b * 256), keep, dim=1, largest=False, sorted=True)
            rows = (best // 256 + base * b).reshape(-1)  # each new survivor's parent, as a row of resid
            entry = best % 256
            resid = resid.index_select(0, rows)  # index_select: several times faster than fancy indexing on CPU
            resid -= self.books[c].index_select(0, entry.reshape(-1))
            codes = codes.view(n * b, self.c).index_select(0, rows).view(n, keep, self.c)
            codes[:, :, c] = entry
            b = keep
        return codes[:, 0].to(torch.uint8)  # sorted: survivor 0 has the least residual
