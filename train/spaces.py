"""``--head model-token``: the student projected into every teacher's space, one learnable model
token per space, and blocks that alternate within and across spaces.

After "Unified Multi-Teacher Distillation Across Hybrid Neural Architectures" (ICLR 2026
submission): CNN and ViT teachers disagree in width, grid and what their tokens mean, so instead of
independent heads the student's tokens are projected into each teacher's space (a linear map per
teacher, for the summary and for the patch tokens), where a learnable **model token** joins them.
Then ``--head-depth`` times, and a last intra-space module after them (so that what the model
tokens exchanged reaches every space's tokens):

- an **intra-space** module: per space, a ViT block over [model token; summary; patches], so each
  space's model token gathers what the student's tokens say in that teacher's terms;
- an **inter-space** module: one ViT block over the model tokens of all spaces (plus a learned
  embedding of which space each came from), so the spaces exchange information, and only through
  their model tokens.

Each space ends with a LayerNorm and two linear maps to its teacher's summary and patch targets
(resized to the teacher's grid by the caller); the losses are each teacher's own, in its own space.
Everything here is discarded at export, like every head.
"""
from __future__ import annotations

import torch
from torch import nn


class ModelTokenSpaces(nn.Module):
    """``forward(summary (B, Ds), patches (B, T, Dp))`` -> {teacher: (summary (B, D_t), patches (B, T, out_t))}."""

    def __init__(self, d_summary: int, d_patch: int, tokens: int, outputs: dict[str, tuple[int, int]], *, width: int,
                 depth: int, heads: int):
        super().__init__()
        from timm.models.vision_transformer import Block
        self.names = list(outputs)
        n = len(self.names)
        self.embed_summary = nn.ModuleDict({t: nn.Linear(d_summary, width) for t in self.names})
        self.embed_patch = nn.ModuleDict({t: nn.Linear(d_patch, width) for t in self.names})
        # one learnable model token per teacher space, and each space's positions for [model, summary, patches]
        self.model_tokens = nn.Parameter(torch.zeros(n, width))
        self.position = nn.Parameter(torch.zeros(n, 2 + tokens, width))
        self.space_embedding = nn.Parameter(torch.zeros(n, width))  # which space a model token speaks for (inter-space)
        for p in (self.model_tokens, self.position, self.space_embedding):
            nn.init.trunc_normal_(p, std=0.02)
        self.intra = nn.ModuleList(nn.ModuleDict({t: Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for t in self.names})
                                   for _ in range(depth + 1))
        self.inter = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.ModuleDict({t: nn.LayerNorm(width) for t in self.names})
        self.summary_out = nn.ModuleDict({t: nn.Linear(width, o[0]) for t, o in outputs.items()})
        self.patch_out = nn.ModuleDict({t: nn.Linear(width, o[1]) for t, o in outputs.items()})

    def forward(self, summary: torch.Tensor, patches: torch.Tensor, *, exchange: bool = True
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``exchange=False`` skips the inter-space modules (the spaces then never meet: tests)."""
        b = summary.shape[0]
        spaces = [torch.cat([self.model_tokens[i].expand(b, 1, -1), self.embed_summary[t](summary)[:, None],
                             self.embed_patch[t](patches)], dim=1) + self.position[i]
                  for i, t in enumerate(self.names)]
        for k, intra in enumerate(self.intra):
            spaces = [intra[t](x) for t, x in zip(self.names, spaces)]
            if exchange and k < len(self.inter):
                models = self.inter[k](torch.stack([x[:, 0] for x in spaces], dim=1) + self.space_embedding)  # (B, n, width)
                spaces = [torch.cat([models[:, i:i + 1], x[:, 1:]], dim=1) for i, x in enumerate(spaces)]
        out = {}
        for t, x in zip(self.names, spaces):
            x = self.norm[t](x)
            out[t] = (self.summary_out[t](x[:, 1]), self.patch_out[t](x[:, 2:]))
        return out
