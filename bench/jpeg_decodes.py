"""The JPEG decode tables of ``kdcache bench load``: full-size against reduced decodes per image size.

The **decode table** times one process decoding and cutting one RandomResizedCrop view per image
at the student's input from in-memory JPEGs of each size (scikit-learn's two photos, resized):
PIL at full size (what timm's and torchvision's loaders do, and kdcache did), kdcache at full size
(``--decode full``: libjpeg-turbo through simplejpeg) and kdcache at the reduced scale the crop
needs (``data.pixels``); target: reduced >= 2x PIL full for a 64-px student on 500-px JPEGs.
Reduced over kdcache's own full decode is printed beside it: how much of the gain is the scale.
A second table times the decode alone, the view given as a store holds it (``data.pixels.decoded``;
PIL's ``open`` + ``convert("RGB")``): the view's drawing and cutting, the same work on either
side, left out.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from kdcache.data.corpus import DecodeOptions
from kdcache.data.demo_corpus import photo_images
from kdcache.data.pixels import Crop, decoded, replay_view, view_pixels
from kdcache.data.views import view_at
from kdcache.data.walk import RawSample, record_to
from kdcache.store.meta import ViewPolicy

from .harness import measure


def decode_table(sizes, *, student: int, images: int, repeat: int) -> list[dict]:
    """Full-size against reduced decodes of in-memory JPEGs whose long side is each of ``sizes``:
    the stage (decode, then one RandomResizedCrop view drawn and cut) and the decode alone (the
    view given, as the cached loader reads it from the store)."""
    photos = photo_images("sklearn")
    policy = ViewPolicy.for_input(0.875, (student, student), views=2)
    crop = [Crop((student, student), "bilinear")]
    rows = []
    for size in sizes:
        jpegs, stored = [], {}
        for i in range(images):
            img = Image.fromarray(photos[i % len(photos)])
            img = img.resize((size, round(size * img.height / img.width)), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            jpegs.append(RawSample(key=f"p{i}", data=buf.getvalue(), label=None, fields=("jpg",)))
            stored[f"p{i}"] = view_at(policy, f"p{i}", 1, img.height, img.width)[None]  # as a store holds it

        def kdcache(reduced: bool, cut: bool):  # the stage (the view drawn and cut), or its decode alone
            opts, stage = DecodeOptions(reduced=reduced), view_pixels if cut else decoded
            views = (lambda s, h, w: view_at(policy, s.key, 1, h, w)[None]) if cut else (lambda s, h, w: stored[s.key])

            def run():
                return sum(1 for _ in stage(jpegs, views=views, crops=crop, decode=opts, handler=record_to([])))
            return run

        def pil(view: bool):
            def run():
                for s in jpegs:  # timm's and torchvision's loaders: PIL, full size, RGB, then the crop
                    image = torch.from_numpy(np.array(Image.open(io.BytesIO(s.data)).convert("RGB"))).permute(2, 0, 1)
                    if view:
                        replay_view(image, view_at(policy, s.key, 1, image.shape[1], image.shape[2]), crop[0].size,
                                    crop[0].interpolation)
                return len(jpegs)
            return run
        m = measure({"pil_full": pil(True), "full": kdcache(False, cut=True), "reduced": kdcache(True, cut=True),
                     "pil_full_decode": pil(False), "full_decode": kdcache(False, cut=False),
                     "reduced_decode": kdcache(True, cut=False)}, repeat=repeat)
        rows.append({"long_side": size, **{k: m.rate(k).to_dict() for k in m.seconds},
                     "reduced_over_pil_full": m.ratio("reduced", "pil_full").to_dict(),
                     "reduced_over_full": m.ratio("reduced", "full").to_dict(),
                     "reduced_decode_over_pil_full_decode": m.ratio("reduced_decode", "pil_full_decode").to_dict()})
    return rows
