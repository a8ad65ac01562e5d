"""The token mixer of a ClusterFormer block: windowed recurrent cross-attention clustering
followed by feature dispatching and an output projection.

The map is cut into ``window_size x window_size``-token windows (padded to whole windows; the
padding is masked, so any ``H x W`` works). In every window ``gh x gw`` centers are initialised
by masked adaptive pooling (``ops.init_centers``), refined ``T`` times by
``ops.recurrent_cross_attention_clustering`` and dispatched back to the window's tokens.
Padding amounts depend on shapes only, never on data, so the mixer compiles with
``fullgraph=True``.

Fast path. When no mask is given and the map is whole windows (every stage at 224, and any
side that is a multiple of 7 tokens), nothing is padded: the mixer skips the padding, the
masks and the final crop, and adds the dispatched update back through a strided view instead
of copying the windows back into the map. The choice is a Python branch on concrete sizes;
under ``torch.export`` with dynamic sizes (symbolic ints) the padded path is always taken, so
one exported graph serves every size.

Center-update variants (Table S1c), ``center_update=``:

* ``"recurrent"``: the paper's; ops assignment ``"softmax_centers"`` (softmax over centers).
* ``"vanilla_attention"``: plain cross-attention, softmax over the window's pixels.
* ``"kmeans"``: hard argmax assignment. The argmax has no gradient, so learned q/k
  projections would be dead weights: this variant assigns in the (normalised) pixel-feature
  space itself (identity q/k) and learns only the value projection.
* ``"cosine"``: ReLU of the cosine similarity between center queries and pixel keys.
* ``"criss_cross"``: CCNet's criss-cross attention (Huang et al. 2019) made a center update.
  CCNet's query is a pixel and attends, softmax over them, to the pixels of its own row and
  column. A center here is born from one cell of the ``gh x gw`` grid (``init_centers``), so
  its "row" and "column" are the bands of window rows and columns its cell covers: the center
  attends (softmax over pixels, as vanilla cross-attention) to the pixels in its row band or
  its column band only (``ops.criss_cross_mask``). CCNet repeats its sparse attention (R = 2)
  so information reaches every pixel; the recurrent iterations play that part here, but since
  pixels do not change between iterations a center keeps seeing only its cross: the variant
  tests whether a sparse, geometry-bound receptive field loses against clustering over the
  whole window.

Dispatching variants (Table S1e), ``dispatching=``:

* ``"ours"``: ``ops.feature_dispatching`` (Eq. 6): best center only, gated by
  ``sigmoid(beta + alpha * cos)``, divided by K, through an MLP, added to the pixel.
* ``"none"``: the pixel adds back its soft-assigned centers, ``softmax_k(x . C_k / sqrt(D))``,
  with no gate, no MLP and no learned parameter.
* ``"fc"``: the pixel's most cosine-similar center through a plain Linear, no gate.
* ``"confidence"``: the best center weighted by its assignment confidence
  ``softmax_k(alpha * cos)`` at the argmax, through the MLP.
* ``"fc_similarity"``: as Context Clusters: the ``sigmoid(beta + alpha * cos)``-weighted sum
  over *all* centers (divided by K), through a plain Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.models.layers import TokenMlp, drop_legacy_keys, static_sizes
from clusterformer.ops import (
    ASSIGNMENTS_OVER_CENTERS,
    criss_cross_mask,
    dispatch_similarity,
    dispatch_update,
    grid_cells,
    init_centers,
    keep_best_center,
    recurrent_cross_attention_clustering,
)
from clusterformer.ops.fused_linear import linear

CENTER_UPDATES: dict[str, str] = {
    "recurrent": "softmax_centers",
    "vanilla_attention": "softmax_pixels",
    "kmeans": "argmax",
    "cosine": "cosine",
    "criss_cross": "softmax_pixels",  # restricted to each center's row and column bands
}
DISPATCHINGS: tuple[str, ...] = ("ours", "none", "fc", "confidence", "fc_similarity")


def window_partition(
    x: Tensor, mask: Tensor | None, window: int
) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
    """Cut a channels-last map into windows of tokens, padding to whole windows.

    Args:
        x: ``(B, H, W, C)``; mask: ``(B, H, W)`` bool (``True`` = real) or ``None``.
        window: window side in tokens.

    Returns:
        tokens ``(B, nW, window * window, C)``, window mask ``(B, nW, window, window)`` (all
        ``True`` when nothing is padded), and the window grid ``(nh, nw)``.
    """
    batch, height, width, dim = x.shape
    # The grid by ceil division and the padding derived from it (equal to ``(-height) %
    # window``): the padded side is then ``nh * window`` by construction, so torch.export
    # proves the reshapes below for every size instead of guarding on the map size.
    nh, nw = (height + window - 1) // window, (width + window - 1) // window
    pad_h, pad_w = nh * window - height, nw * window - width
    # Pad and mask unconditionally: a Python branch on the padding would make torch.export
    # specialise the graph to one residue of the map size modulo the window.
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    if mask is None:
        mask = torch.ones(batch, height, width, dtype=torch.bool, device=x.device)
    mask = F.pad(mask, (0, pad_w, 0, pad_h), value=False)
    # An explicit contiguous clone, not ``reshape``: reshape checks whether the permuted
    # strides allow a view, which holds only when ``nw == 1`` and makes torch.export guard on it.
    tokens = x.reshape(batch, nh, window, nw, window, dim).permute(0, 1, 3, 2, 4, 5)
    tokens = _contiguous(tokens).view(batch, nh * nw, window * window, dim)
    mask = mask.reshape(batch, nh, window, nw, window).permute(0, 1, 3, 2, 4)
    mask = _contiguous(mask).view(batch, nh * nw, window, window)
    return tokens, mask, (nh, nw)


def _whole_windows(x: Tensor, window: int) -> bool:
    """True when the map ``(B, H, W, C)`` is whole windows of concrete size. Symbolic sizes
    (torch.export with dynamic shapes) answer False: the padded path then serves every size."""
    return static_sizes(x) and x.shape[1] % window == 0 and x.shape[2] % window == 0


def _contiguous(x: Tensor) -> Tensor:
    return x.clone(memory_format=torch.contiguous_format)


def window_merge(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, w*w, C)`` -> ``(B, H, W, C)`` cropped."""
    batch, _, length, dim = tokens.shape
    window = round(length**0.5)
    nh, nw = grid
    x = tokens.reshape(batch, nh, nw, window, window, dim).permute(0, 1, 3, 2, 4, 5)
    x = _contiguous(x).view(batch, nh * window, nw * window, dim)
    # Crop by negative padding rather than slicing: the result is then exactly ``size`` for
    # torch.export, whereas a slice's end is clamped to the padded size behind a guard.
    return F.pad(x, (0, 0, 0, size[1] - nw * window, 0, size[0] - nh * window))


class Dispatch(nn.Module):
    """Send cluster centers back to pixels: ``(..., N, D), (..., K, D) -> (..., N, D)``.

    ``mode`` is one of :data:`DISPATCHINGS` (see the module docstring).
    """

    def __init__(self, dim: int, mode: str = "ours", mlp_hidden: int | None = None) -> None:
        super().__init__()
        if mode not in DISPATCHINGS:
            raise ValueError(f"unknown dispatching {mode!r}; expected one of {DISPATCHINGS}")
        self.mode = mode
        hidden = mlp_hidden or max(dim // 4, 8)
        if mode in ("ours", "confidence", "fc_similarity"):
            self.alpha = nn.Parameter(torch.ones(()))
        if mode in ("ours", "fc_similarity"):
            self.beta = nn.Parameter(torch.zeros(()))
        if mode in ("ours", "confidence"):
            self.mlp = TokenMlp(dim, hidden)
        if mode in ("fc", "fc_similarity"):
            self.fc = nn.Linear(dim, dim)

    def forward(self, features: Tensor, centers: Tensor) -> Tensor:
        return features + self.update(features, centers)

    def update(self, features: Tensor, centers: Tensor) -> Tensor:
        """What each pixel receives, ``(..., N, D)``: ``forward`` adds it to the features."""
        if self.mode == "ours":
            return self.mlp(dispatch_update(features, centers, alpha=self.alpha, beta=self.beta))
        if self.mode == "none":
            logits = features @ centers.transpose(-1, -2) * features.shape[-1] ** -0.5
            return torch.softmax(logits, dim=-1) @ centers
        if self.mode == "fc_similarity":
            sim = dispatch_similarity(features, centers, self.alpha, self.beta)
            return self.fc(sim.transpose(-1, -2) @ centers / centers.shape[-2])
        cosine = F.normalize(centers, dim=-1) @ F.normalize(features, dim=-1).transpose(-1, -2)
        if self.mode == "fc":
            best = cosine.argmax(dim=-2, keepdim=True)
            index = torch.arange(cosine.shape[-2], device=cosine.device).unsqueeze(-1)
            one_hot = (index == best).to(cosine.dtype)
            return self.fc(one_hot.transpose(-1, -2) @ centers)
        confidence = keep_best_center(torch.softmax(self.alpha * cosine, dim=-2))
        return self.mlp(confidence.transpose(-1, -2) @ centers)


class ClusteringMixer(nn.Module):
    """Windowed recurrent cross-attention clustering + dispatching + output projection.

    ``forward(x (B, H, W, C), mask (B, H, W) | None) -> (B, H, W, C)`` (channels-last).
    Outputs at padded positions are defined but meaningless; real positions never depend
    on them.
    """

    def __init__(
        self,
        dim: int,
        *,
        head_dim: int = 32,
        window_size: int = 7,
        center_grid: tuple[int, int] = (3, 3),
        num_iters: int = 3,
        center_update: str = "recurrent",
        dispatching: str = "ours",
        m_step: str = "sum",
        dispatch_hidden: int | None = None,
    ) -> None:
        super().__init__()
        if center_update not in CENTER_UPDATES:
            raise ValueError(
                f"unknown center_update {center_update!r}; expected one of {tuple(CENTER_UPDATES)}"
            )
        if m_step not in ("sum", "mean"):
            raise ValueError(f"unknown m_step {m_step!r}; expected 'sum' or 'mean'")
        if head_dim <= 0 or dim % head_dim:
            raise ValueError(f"head_dim {head_dim} must divide the stage width {dim}")
        if window_size < 1 or min(center_grid) < 1:
            raise ValueError("window_size and center_grid entries must be >= 1")
        self.dim = dim
        self.num_heads = dim // head_dim
        self.window_size = int(window_size)
        self.center_grid = (int(center_grid[0]), int(center_grid[1]))
        self.num_iters = int(num_iters)
        self.center_update = center_update
        self.assignment = CENTER_UPDATES[center_update]
        self.m_step = m_step
        if center_update != "kmeans":
            # No query bias where the assignment is over centers: it would cancel there, and a
            # parameter the loss cannot see drifts on rounding noise under AdamW until, in
            # bf16, its offset swamps the logits (docs/benchmarks.md, "bf16 training on the
            # CPU"). Checkpoints made with one load without it.
            query_bias = self.assignment not in ASSIGNMENTS_OVER_CENTERS
            self.q = nn.Linear(dim, dim, bias=query_bias)
            self.k = nn.Linear(dim, dim)
            self.legacy_state_keys = () if query_bias else ("q.bias",)
        self.v = nn.Linear(dim, dim)
        self.dispatch = Dispatch(dim, dispatching, dispatch_hidden)
        self.proj = nn.Linear(dim, dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        drop_legacy_keys(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _params(self, like: Tensor) -> dict[str, Tensor | None]:
        if self.center_update == "kmeans":
            eye = torch.eye(self.dim, dtype=like.dtype, device=like.device)
            q_w, q_b, k_w, k_b = eye, None, eye, None
        else:
            q_w, q_b, k_w, k_b = self.q.weight, self.q.bias, self.k.weight, self.k.bias
        return {
            "q_weight": q_w, "q_bias": q_b, "k_weight": k_w, "k_bias": k_b,
            "v_weight": self.v.weight, "v_bias": self.v.bias,
        }

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None and _whole_windows(x, self.window_size):
            return self._forward_whole_windows(x)
        batch, height, width, dim = x.shape
        window = self.window_size
        tokens, win_mask, grid = window_partition(x, mask, window)
        flat_mask = win_mask.flatten(-2)
        # Zero padding so nothing non-finite can leak through `0 * value` products.
        tokens = tokens * flat_mask.unsqueeze(-1).to(tokens.dtype)
        maps = tokens.transpose(-1, -2).reshape(batch, -1, dim, window, window)
        centers = init_centers(maps, self.center_grid, mask=win_mask)
        centers = self._cluster(tokens, centers, flat_mask)
        # ops.linear, as in the whole-window path: oneDNN's kernel (and a frozen model's packed
        # weight) rather than nn.Linear's BLAS call.
        out = linear(self.dispatch(tokens, centers), self.proj.weight, self.proj.bias)
        return window_merge(out, grid, (height, width))

    def _forward_whole_windows(self, x: Tensor) -> Tensor:
        """:meth:`forward` for an unmasked map of whole windows: nothing to pad or mask."""
        batch, height, width, dim = x.shape
        window = self.window_size
        nh, nw = height // window, width // window
        grid_view = x.view(batch, nh, window, nw, window, dim)
        tokens = grid_view.transpose(2, 3).reshape(batch, nh * nw, window * window, dim)
        # A channels-last view: adaptive pooling reads it in place.
        maps = tokens.view(batch, nh * nw, window, window, dim).movedim(-1, -3)
        centers = self._cluster(tokens, init_centers(maps, self.center_grid), None)
        update = self.dispatch.update(tokens, centers)
        # The residual add reads the windows through a strided view and writes the map layout:
        # no separate copy back from windows.
        window_view = update.view(batch, nh, nw, window, window, dim).transpose(2, 3)
        mixed = (grid_view + window_view).reshape(batch, height, width, dim)
        return linear(mixed, self.proj.weight, self.proj.bias)

    def _cluster(self, tokens: Tensor, centers: Tensor, mask: Tensor | None) -> Tensor:
        attn_mask = None
        if self.center_update == "criss_cross":
            # Shapes only (window and grid), no data: the same (K, w*w) mask for every window.
            size = (self.window_size, self.window_size)
            bands = [b.to(tokens.device) for b in grid_cells(self.center_grid, size)]
            attn_mask = criss_cross_mask(*bands, size)
        return recurrent_cross_attention_clustering(
            tokens, centers, self._params(tokens),
            num_iters=self.num_iters, num_heads=self.num_heads, mask=mask,
            assignment=self.assignment, m_step=self.m_step, attn_mask=attn_mask,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, window={self.window_size}, "
            f"centers={self.center_grid}, T={self.num_iters}, update={self.center_update}, "
            f"m_step={self.m_step}"
        )
