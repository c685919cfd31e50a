"""Training-time augmentation of 2D CT slices: batched torch ops, deterministic per sample.

The models are judged on CT from renderers (and scanners) they never saw, so the augmentation
randomises what a renderer or scanner changes -- intensities and textures -- as well as geometry:

- geometry (image and label moved together): left-right / anterior-posterior flips, a small
  rotation and isotropic scaling, an optional smooth elastic deformation;
- intensity and texture (image only): a smooth multiplicative bias field, random gamma,
  contrast and brightness, a shifted/narrowed intensity window (the HU window a site happens to
  use), blur or sharpening, simulated low resolution, white Gaussian noise of varied level and
  spatially correlated ("textured") noise;
- domain randomisation (SynthSeg style, off by default: ``domain_random_prob``; uses the label):
  a random intensity curve, monotone or not, so tissue contrasts change or reorder, then a random
  intensity shift and texture of each label region, so kidney and tumour are never one fixed
  intensity. The ops above (bias, blur, low resolution, noise) then act on the result.

Usage::

    aug = SliceAugmenter(AugmentConfig(), seed=0)
    image, label = aug(image, label, keys)   # image [B,1,H,W] float, label [B,H,W] int64

``keys`` are integers, one per sample: its position in the global sample sequence of the epoch
(``epoch`` goes into the seed via :meth:`SliceAugmenter.sample_seeds`). Every random number a
sample sees comes from a generator seeded with ``(seed, epoch, global index)`` -- never from the
rank -- so a 2-rank run augments exactly like a 1-rank run with the same global batches.

Why hand-written rather than MONAI's ``Rand*`` transforms: MONAI's random array transforms draw
their parameters one sample at a time from a numpy ``RandomState`` owned by each transform object;
here every sample's parameters must come from its own ``(seed, epoch, index)`` stream, and the work
should be one batched tensor op per transform on the training device (GPU on a cluster). The ops
themselves are the textbook ones (nnU-Net's intensity set, ``F.affine_grid``/``F.grid_sample`` for
geometry). Intensity ops are scale-free: they use each slice's own min/max/mean/std, so they work
for both preprocessing schemes (z-scored ``ct`` and ``window`` in [-1, 1]).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SliceAugmenter", "derive_seed", "gaussian_blur"]

_N_UNIFORMS = 32  # fixed number of uniforms drawn per sample, so enabling an op never shifts another's draws
_REGIONS = 4      # label classes 1..4 get their own random shift and texture under domain randomisation


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence), e.g. ``(seed, epoch, index)``."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Blur each sample of ``x`` [B,C,H,W] with its own Gaussian ``sigma`` [B] (pixels).

    A separable blur (reflect padding) written as a weighted sum of shifted copies of the slice: only
    element-wise products and sums, in a fixed order, so a sample's result is bitwise the same whatever
    other samples share its batch. A grouped ``conv2d`` is not: on CPU it runs oneDNN's depthwise kernel
    when there are several groups and torch's own kernel when there is one, and the two round differently
    (~1e-7), so a sample blurred alone differed from the same sample blurred beside another. That made a
    2-rank run drift from a 1-rank run by 4e-4 of the weights after 4 steps (the network amplifies it where
    flat regions -- a clipped window, a rotation's border padding -- meet blur or noise; with the blur made
    batch-invariant the drift is 6e-8). ``sigma`` close to 0 gives back ``x``. The kernel
    radius is ``ceil(3 * max_sigma)``; pass the largest sigma that can occur so that a sample's result
    does not depend on which other samples share its batch (the default, the batch's largest sigma, does).

    Args:
        x: images [B, C, H, W].
        sigma: one standard deviation per sample [B], in pixels.
        max_sigma: the largest sigma that can occur (sets the kernel radius); default ``sigma.max()``.

    Returns:
        The blurred images, same shape and dtype as ``x``.
    """
    b, c, h, w = x.shape
    sigma = sigma.to(x.device, x.dtype).clamp_min(1e-3)
    top = float(sigma.max()) if max_sigma is None else float(max_sigma)
    radius = max(1, int(math.ceil(3.0 * top)))
    radius = max(1, min(radius, (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)                                # [B, K]
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = _shifted_sum(y, k, dim=3, n=w)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return _shifted_sum(y, k, dim=2, n=h)


def _shifted_sum(y: torch.Tensor, k: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``sum_j k[:, j] * y.narrow(dim, j, n)``, term by term in ``j`` order (bitwise batch-invariant)."""
    out = y.narrow(dim, 0, n) * k[:, 0, None, None, None]
    for j in range(1, k.shape[1]):
        out = out + y.narrow(dim, j, n) * k[:, j, None, None, None]
    return out


def _uniform(u: torch.Tensor, lo_hi: Sequence[float]) -> torch.Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * u


class SliceAugmenter:
    """Random geometry + intensity/texture augmentation of a batch of slices (see module doc).

    Args:
        cfg: an :class:`hpc_dfs.config.train.AugmentConfig` (probabilities and ranges).
        seed: the run's seed; combined with the epoch and each sample's global index.
    """

    def __init__(self, cfg, seed: int = 0):
        self.cfg = cfg
        self.seed = int(seed)

    # ------------------------------------------------------------------ randomness
    def sample_seeds(self, epoch: int, keys: Sequence[int]) -> list[int]:
        """Per-sample seeds from (run seed, epoch, global sample index)."""
        return [derive_seed(self.seed, epoch, int(k)) for k in keys]

    def _draw(self, seeds: Sequence[int], device: torch.device):
        """Uniforms [B,K], bias-field [B,1,4,4] and elastic [B,2,g,g] seeds of each sample, from its generator."""
        g = self.cfg.elastic_grid
        u, bias, elastic = [], [], []
        for s in seeds:
            gen = torch.Generator().manual_seed(s)
            u.append(torch.rand(_N_UNIFORMS, generator=gen))
            bias.append(torch.randn(1, 4, 4, generator=gen))
            elastic.append(torch.randn(2, g, g, generator=gen))
        stack = lambda xs: torch.stack(xs).to(device)  # noqa: E731
        return stack(u), stack(bias), stack(elastic)

    @staticmethod
    def _noise(seeds: Sequence[int], idx: list[int], salt: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Full-size N(0,1) fields [len(idx),1,H,W], drawn only for the samples that use them."""
        fields = [torch.randn(1, h, w, generator=torch.Generator().manual_seed(derive_seed(seeds[i], salt)))
                  for i in idx]
        return torch.stack(fields).to(device)

    # ------------------------------------------------------------------ entry point
    @torch.no_grad()
    def __call__(self, image: torch.Tensor, label: torch.Tensor, keys: Sequence[int], epoch: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``image`` [B,1,H,W] and ``label`` [B,H,W] consistently; returns new tensors."""
        if image.dim() != 4 or label.dim() != 3 or image.shape[0] != label.shape[0] or len(keys) != image.shape[0]:
            raise ValueError(f"augment expects image [B,1,H,W], label [B,H,W] and B keys; got {tuple(image.shape)}, "
                             f"{tuple(label.shape)}, {len(keys)} keys")
        if image.shape[0] == 0:
            return image, label
        b, _, h, w = image.shape
        seeds = self.sample_seeds(epoch, keys)
        u, bias, elastic = self._draw(seeds, image.device)
        x = image.float()
        y = label
        x, y = self._geometry(x, y, u, elastic)
        x = self._domain_random(x, y, u, seeds)
        x = self._intensity(x, u, bias, seeds)
        return x.to(image.dtype), y

    # ------------------------------------------------------------------ geometry
    def _geometry(self, x, y, u, elastic):
        c = self.cfg
        b, _, h, w = x.shape
        # exact flips (index ops, no resampling)
        flip_w = u[:, 0] < c.flip_lr
        flip_h = u[:, 1] < c.flip_ap
        if flip_w.any():
            x = torch.where(flip_w[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip_w[:, None, None], y.flip(-1), y)
        if flip_h.any():
            x = torch.where(flip_h[:, None, None, None], x.flip(-2), x)
            y = torch.where(flip_h[:, None, None], y.flip(-2), y)
        # rotation + scaling (+ elastic) through one grid_sample on the samples that need it
        do_affine = u[:, 2] < c.affine_prob
        do_elastic = u[:, 3] < c.elastic_prob
        warp = do_affine | do_elastic
        if not warp.any():
            return x, y
        idx = warp.nonzero().flatten()
        angle = torch.where(do_affine, (2 * u[:, 4] - 1) * math.radians(c.rotate_deg), torch.zeros_like(u[:, 4]))
        zoom = torch.where(do_affine, _uniform(u[:, 5], c.scale), torch.ones_like(u[:, 5]))
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input coordinates
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin * h / w, sin * w / h, cos
        if c.translate:  # a random move of up to +-translate of the slice (stage 2: stage 1's box errors)
            move = (2 * u[:, 28:30] - 1) * (2 * c.translate)
            move = torch.where(do_affine[:, None], move, torch.zeros_like(move))
            theta[:, 0, 2], theta[:, 1, 2] = move[:, 0], move[:, 1]
        theta = theta[idx]
        grid = F.affine_grid(theta, [len(idx), 1, h, w], align_corners=False)
        if do_elastic.any():
            disp = F.interpolate(elastic[idx], size=(h, w), mode="bicubic", align_corners=False)
            px = float(c.elastic_pixels) * do_elastic[idx].float()[:, None, None, None]
            disp = disp * px * torch.tensor([2.0 / w, 2.0 / h], device=x.device)[None, :, None, None]
            grid = grid + disp.permute(0, 2, 3, 1)
        xs = F.grid_sample(x[idx], grid, mode="bilinear", padding_mode="border", align_corners=False)
        ys = F.grid_sample(y[idx, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        x = x.clone()
        y = y.clone()
        x[idx] = xs
        y[idx] = ys[:, 0].round().to(y.dtype)
        return x, y

    # ------------------------------------------------------------------ domain randomisation
    def _domain_draws(self, seeds: Sequence[int], idx: list[int], h: int, w: int, device: torch.device) -> dict:
        """Each chosen sample's curve, region shifts/textures and texture field, from its own generator (salt 3)."""
        k = int(self.cfg.remap_points)
        rows = []
        for i in idx:
            gen = torch.Generator().manual_seed(derive_seed(seeds[i], 3))
            rows.append((torch.rand(k, generator=gen), torch.rand(2 + 2 * _REGIONS, generator=gen),
                         torch.randn(1, h, w, generator=gen)))
        curve, u, noise = (torch.stack(col).to(device) for col in zip(*rows))
        return {"curve": curve, "monotone": u[:, 0] < self.cfg.remap_monotone, "grain": u[:, 1],
                "shift": 2 * u[:, 2:2 + _REGIONS] - 1, "texture": u[:, 2 + _REGIONS:], "noise": noise}

    @staticmethod
    def _remap(x: torch.Tensor, curve: torch.Tensor, monotone: torch.Tensor) -> torch.Tensor:
        """A random piecewise-linear intensity curve [n,K] on each sample's own [min, max] range."""
        dims = (1, 2, 3)
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        span = (hi - lo).clamp_min(1e-6)
        sorted_curve = curve.sort(dim=1).values
        rising = (sorted_curve - sorted_curve[:, :1]) / (sorted_curve[:, -1:] - sorted_curve[:, :1]).clamp_min(1e-6)
        v = torch.where(monotone[:, None], rising, curve)
        k = v.shape[1]
        pos = ((x - lo) / span).clamp(0, 1) * (k - 1)
        i0 = pos.floor().clamp(max=k - 2).long()
        frac = pos - i0
        v0 = torch.gather(v, 1, i0.flatten(1)).view_as(x)
        v1 = torch.gather(v, 1, (i0 + 1).flatten(1)).view_as(x)
        return lo + (v0 + (v1 - v0) * frac) * span

    def _domain_random(self, x, y, u, seeds):
        """SynthSeg-style randomisation of the samples that draw it (``u[:, 26]``), before the intensity ops.

        A random intensity curve (monotone or not) re-maps the tissues; then each label region
        (classes 1.., edges smoothed by ``region_edge`` px) is shifted by its own random amount and
        given its own textured noise, in units of the slice's std. With several input channels
        (2.5D context) every channel gets the same curve and the centre label's regions.
        """
        c = self.cfg
        idx = (u[:, 26] < c.domain_random_prob).nonzero().flatten().tolist()
        if not idx:
            return x
        _, _, h, w = x.shape
        d = self._domain_draws(seeds, idx, h, w, x.device)
        xi = x[idx]
        std = xi.std((1, 2, 3), keepdim=True).clamp_min(1e-6)
        xi = self._remap(xi, d["curve"], d["monotone"])
        shift = d["shift"] * c.region_shift                                   # [n,R]
        amp = _uniform(d["texture"], c.region_texture)                        # [n,R]
        # per-pixel shift and texture amplitude of the pixel's region; smoothing them is smoothing each region
        maps = torch.zeros(len(idx), 2, h, w, device=x.device, dtype=x.dtype)
        yi = y[idx]
        for r in range(1, _REGIONS + 1):
            inside = (yi == r).to(x.dtype)
            maps[:, 0] += inside * shift[:, r - 1, None, None]
            maps[:, 1] += inside * amp[:, r - 1, None, None]
        if c.region_edge > 0:
            edge = torch.full((len(idx),), float(c.region_edge), device=x.device)
            maps = gaussian_blur(maps, edge, max_sigma=c.region_edge)
        grain = _uniform(d["grain"], c.texture_sigma)
        tex = gaussian_blur(d["noise"], grain, max_sigma=c.texture_sigma[1])
        tex = tex / tex.std((1, 2, 3), keepdim=True).clamp_min(1e-6)
        x = x.clone()
        x[idx] = xi + (maps[:, :1] + maps[:, 1:] * tex) * std
        return x

    # ------------------------------------------------------------------ intensity and texture
    def _intensity(self, x, u, bias, seeds):
        """Each op runs on the subset of samples that drew it (``idx``), then is written back."""
        c = self.cfg
        b, _, h, w = x.shape
        dims = (1, 2, 3)
        x = x.clone()
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        span = (hi - lo).clamp_min(1e-6)
        std = x.std(dims, keepdim=True).clamp_min(1e-6)   # the input slice's std: the unit of noise levels

        def subset(col: int, p: float) -> list[int]:
            return (u[:, col] < p).nonzero().flatten().tolist()

        def v(t):  # [n] -> [n,1,1,1]
            return t[:, None, None, None]

        # smooth multiplicative bias field (scanner inhomogeneity / renderer shading)
        idx = subset(6, c.bias_prob)
        if idx:
            field = F.interpolate(bias[idx], size=(h, w), mode="bicubic", align_corners=False)
            field = torch.exp(field * v(c.bias_strength * u[idx, 7]))
            x[idx] = lo[idx] + (x[idx] - lo[idx]) * field
        # gamma on the slice's own [min, max] range, log-uniform exponent
        idx = subset(8, c.gamma_prob)
        if idx:
            gamma = torch.exp(_uniform(u[idx, 9], (math.log(c.gamma[0]), math.log(c.gamma[1]))))
            xn = ((x[idx] - lo[idx]) / span[idx]).clamp(0, 1)
            x[idx] = lo[idx] + xn ** v(gamma) * span[idx]
        # contrast about the mean, then brightness in units of the slice's std
        idx = subset(10, c.contrast_prob)
        if idx:
            mean = x[idx].mean(dims, keepdim=True)
            contrast, bright = _uniform(u[idx, 11], c.contrast), (2 * u[idx, 12] - 1) * c.brightness
            x[idx] = (x[idx] - mean) * v(contrast) + mean + v(bright) * std[idx]
        # a narrower / shifted intensity window: clip a random fraction of the range off either end
        idx = subset(13, c.window_prob)
        if idx:
            xi = x[idx]
            lo2, hi2 = xi.amin(dims, keepdim=True), xi.amax(dims, keepdim=True)
            x[idx] = torch.maximum(torch.minimum(xi, hi2 - v(u[idx, 14] * c.window_clip) * (hi2 - lo2)),
                                   lo2 + v(u[idx, 15] * c.window_clip) * (hi2 - lo2))
        # blur (amount < 0) or unsharp-mask sharpening (amount > 0): x + a * (x - blur(x))
        idx = subset(16, c.blur_prob)
        if idx:
            xi = x[idx]
            blurred = gaussian_blur(xi, _uniform(u[idx, 17], c.blur_sigma), max_sigma=c.blur_sigma[1])
            x[idx] = xi + v(_uniform(u[idx, 18], c.sharpen_amount)) * (xi - blurred)
        # simulated low resolution: area-downsample by a random factor, bilinear back
        for i in subset(19, c.lowres_prob):
            f = float(_uniform(u[i, 20], c.lowres_factor))
            small = (max(4, int(round(h / f))), max(4, int(round(w / f))))
            xi = F.interpolate(x[i:i + 1], size=small, mode="area")
            x[i:i + 1] = F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False)
        # white noise of varied level
        idx = subset(21, c.noise_prob)
        if idx:
            white = self._noise(seeds, idx, 1, h, w, x.device)
            x[idx] = x[idx] + white * v(_uniform(u[idx, 22], c.noise_std)) * std[idx]
        # spatially correlated ("textured") noise of random grain
        idx = subset(23, c.texture_prob)
        if idx:
            tex = gaussian_blur(self._noise(seeds, idx, 2, h, w, x.device), _uniform(u[idx, 24], c.texture_sigma),
                                max_sigma=c.texture_sigma[1])
            tex = tex / tex.std(dims, keepdim=True).clamp_min(1e-6)
            x[idx] = x[idx] + tex * v(_uniform(u[idx, 25], c.texture_std)) * std[idx]
        return x
