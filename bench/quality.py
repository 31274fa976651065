"""Image quality against the uncached image of the same seed: PSNR (`harmonica.digits.psnr`) and SSIM.

Images are decoded VAE outputs `(B, C, H, W)` in [-1, 1] (clamped); both metrics compare the same
seed with and without caching, so with random weights they measure the deviation caching causes.
"""

import torch
import torch.nn.functional as F

from harmonica.digits import psnr

__all__ = ["psnr", "ssim"]

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    """(channels, 1, size, size) normalised 2-D Gaussian for a depthwise convolution."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid
    positions only) of images in [-1, 1], computed on [0, 1] per channel; 1.0 for identical images.

    images, reference: (B, C, H, W); windows shrink to the image for images under 11 pixels.
    """
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(f"images, reference: expected two (B, C, H, W) tensors of one shape, got "
                         f"{tuple(images.shape)} and {tuple(reference.shape)}")
    x = (images.double().clamp(-1, 1) + 1) / 2
    y = (reference.double().clamp(-1, 1) + 1) / 2
    channels = x.shape[1]
    window = _gaussian_window(min(SSIM_WINDOW, *x.shape[-2:]), SSIM_SIGMA, channels).to(x.device)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return value.mean().item()
