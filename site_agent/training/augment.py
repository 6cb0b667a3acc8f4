"""Augmentation multiplicity: K randomly shifted and flipped copies of every example in a step.

Why (De et al., "Unlocking high-accuracy differentially private image classification through
scale", 2022, section 3.2): under DP-SGD each example's gradient is clipped and the noise is set
by the clip norm, so the useful part of a step is the clipped per-example signal. Averaging an
example's gradient over K augmented views *before* clipping lowers the variance of that signal
without touching the privacy analysis: the example still contributes one clipped vector of norm
at most C, whatever function of the example it is (the augmentation's randomness is public and
independent of the data). Without DP the same K views are plain data augmentation, so every arm
of a comparison trains on the same views.

The views are the augmentation of that paper (random crop after padding, random horizontal flip),
written for any square input size: a shift of up to 1/14 of the side (2 px at 28 px, 16 px at
224 px) with the border pixels repeated, and a left-right flip with probability 1/2. A left-right
flip keeps what a chest radiograph is labelled for (opacities, not situs); a site whose task
depends on laterality sets ``augmentations = 0``.

The copies of one example are adjacent (example-major): rows ``i*K .. i*K+K-1`` are example i,
which is how the per-sample-gradient engines group them (engines.py, ``group``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the largest shift, as a fraction of the side (2 px of 28, the paper's 4 px of 32 is 1/8)
SHIFT_FRACTION = 1.0 / 14.0


def max_shift(side: int) -> int:
    """Pixels an image of ``side`` pixels may move each way: round(side / 14), at least 1."""
    return max(1, round(side * SHIFT_FRACTION))


def augment(x: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """``copies`` random views of every image of ``x`` (N, C, H, W), example-major: (N * copies, C, H, W).

    The randomness comes from ``generator`` (a CPU generator; the draws are moved to x's device),
    so a seeded site trains reproducibly. Integer shifts and flips only: no interpolation, so a
    view holds exactly the example's pixels, moved.
    """
    if copies < 1:
        raise ValueError("copies must be >= 1")
    if x.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    rows = n * copies
    ph, pw = max_shift(h), max_shift(w)
    dy = torch.randint(0, 2 * ph + 1, (rows,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pw + 1, (rows,), generator=generator).to(x.device)
    flip = (torch.rand(rows, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pw, pw, ph, ph), mode="replicate").repeat_interleave(copies, dim=0)  # (rows, C, H+2p, W+2p)
    iy = (dy.view(rows, 1) + torch.arange(h, device=x.device).view(1, h))  # (rows, H)
    cols = torch.arange(w, device=x.device).view(1, w)
    cols = torch.where(flip.view(rows, 1), w - 1 - cols, cols)
    ix = dx.view(rows, 1) + cols  # (rows, W)
    # gather rows, then columns: index (rows, C, H, W+2p) then (rows, C, H, W)
    out = padded.gather(2, iy.view(rows, 1, h, 1).expand(rows, c, h, padded.shape[3]))
    return out.gather(3, ix.view(rows, 1, 1, w).expand(rows, c, h, w))


__all__ = ["SHIFT_FRACTION", "augment", "max_shift"]
