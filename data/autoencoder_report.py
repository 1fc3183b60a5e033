"""How well a latent space (the shapes autoencoder's, data/autoencoder.py) keeps what the
verifier reads: per-pixel error, verifier agreement after the round trip (clean and with
noisy latents) and a grid of originals over reconstructions.
"""

from __future__ import annotations

import numpy as np
import torch

from data.latents import images_from_uint8, images_to_uint8
from data.shapes_check import score_caption


@torch.no_grad()
def reconstruction_report(latents, held_out: dict[str, tuple[torch.Tensor, list[str]]], noise: float = 0.1,
                          seed: int = 0) -> dict:
    """How well `latents` (encode/decode, e.g. ShapesAELatents) reconstructs held-out world images.

    mae: mean |decoded - original| per pixel and channel in [0, 255] units (decoded rounded
    to uint8, as a PNG holds it). agreement: share of images whose verifier result
    (score_caption: colours, shapes, relation) is the same after the round trip.
    agreement_noisy: the same with N(0, noise^2) added to the (normalised) latents first,
    how forgiving the decoder is of a sampler's imperfect latents.
    """
    gen = torch.Generator().manual_seed(seed)
    streams, rows = {}, []
    for name, (images_NHWC, captions) in held_out.items():
        z = latents.encode(images_from_uint8(images_NHWC))
        recon = images_to_uint8(latents.decode(z))
        noisy = images_to_uint8(latents.decode(z + noise * torch.randn(z.shape, generator=gen)))
        abs_err = (recon.int() - images_NHWC.int()).abs().float().mean(dim=(1, 2, 3))
        these = []
        for i, caption in enumerate(captions):
            want = score_caption(images_NHWC[i].numpy(), caption)
            got = score_caption(recon[i].numpy(), caption)
            these.append({"mae": float(abs_err[i]), "agree": got == want,
                          "agree_noisy": score_caption(noisy[i].numpy(), caption) == want,
                          "orig_ok": all(want.values()), "recon_ok": all(got.values()),
                          **{f"changed_{k}": got[k] != want[k] for k in want}})
        streams[name] = {"n": len(these), "mae": round(float(np.mean([r["mae"] for r in these])), 3),
                         "agreement": round(float(np.mean([r["agree"] for r in these])), 4),
                         "agreement_noisy": round(float(np.mean([r["agree_noisy"] for r in these])), 4)}
        rows += these

    def share(key):
        return round(float(np.mean([r[key] for r in rows])), 4)

    return {"num_images": len(rows), "mae": round(float(np.mean([r["mae"] for r in rows])), 3),
            "agreement": share("agree"), "agreement_noisy": share("agree_noisy"), "noise": noise,
            "caption_match_original": share("orig_ok"), "caption_match_reconstructed": share("recon_ok"),
            "changed": {k: share(f"changed_{k}") for k in ("colours", "shapes", "relation")}, "streams": streams}


def summary(report: dict) -> str:
    pink = report["streams"].get("pink", {})
    return (f"MAE {report['mae']:.2f}/255 | verifier agreement {report['agreement']:.1%} "
            f"(pink {pink.get('agreement', float('nan')):.1%}) | with latent noise {report['noise']}: "
            f"{report['agreement_noisy']:.1%} | caption match {report['caption_match_original']:.1%} -> "
            f"{report['caption_match_reconstructed']:.1%} on {report['num_images']} held-out images")


@torch.no_grad()
def reconstruction_grid(latents, held_out: dict[str, tuple[torch.Tensor, list[str]]], per_stream: int = 8,
                        cols: int = 8) -> np.ndarray:
    """uint8 (H, W, 3): originals in the top rows, their reconstructions in the rows below."""
    originals = torch.cat([images[:per_stream] for images, _ in held_out.values()])
    recon = images_to_uint8(latents.decode(latents.encode(images_from_uint8(originals))))
    n, size = len(originals), originals.shape[1]
    scale, gap = max(1, 96 // size), 4
    cell, rows = size * scale, -(-n // cols)
    block_h = rows * (cell + gap)
    canvas = np.full((2 * block_h + 3 * gap, cols * (cell + gap) + gap, 3), 255, np.uint8)
    for block, images in enumerate((originals, recon)):  # a double gap between the two blocks
        for i, image in enumerate(images.numpy()):
            y = gap + block * (block_h + 2 * gap) + (i // cols) * (cell + gap)
            x = gap + (i % cols) * (cell + gap)
            canvas[y:y + cell, x:x + cell] = image.repeat(scale, 0).repeat(scale, 1)
    return canvas


# ---- the folder ------------------------------------------------------------------------------
