"""Clustering as pure functions: the supplement's Algorithm 1 (recurrent cross-attention
clustering) and Algorithm 2 (feature dispatching).

Every function is stateless, never writes into its inputs and has no data-dependent Python
control flow, so each one runs under ``torch.compile(fullgraph=True)``, ``torch.func.vmap``,
``torch.func.grad`` and ``torch.func.functional_call``. Shapes broadcast over any leading
batch dimensions ``...``: batch, windows and heads can be folded together.

Notation: ``K`` centers, ``N`` pixels (tokens), ``D`` channels, ``d`` channels per head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformer.ops.fused_linear import _needs_grad, linear

Assignment = Literal["softmax_centers", "softmax_pixels", "argmax", "cosine"]
MStep = Literal["sum", "mean"]

ASSIGNMENTS: tuple[str, ...] = ("softmax_centers", "softmax_pixels", "argmax", "cosine")
# Assignments that compare a pixel's logits across centers only (softmax or argmax over
# ``K``): a query bias ``b`` adds ``b . k_n`` to every center's logit for pixel ``n``, a per-pixel
# constant they cancel exactly, so the query projection of such an E-step needs no bias.
ASSIGNMENTS_OVER_CENTERS: tuple[str, ...] = ("softmax_centers", "argmax")
M_STEPS: tuple[str, ...] = ("sum", "mean")

_EPS = 1e-6


def init_centers(
    features: Tensor, grid: tuple[int, int], *, mask: Tensor | None = None
) -> Tensor:
    r"""Initial cluster centers by adaptive average pooling of a feature map.

    Args:
        features: ``(..., D, H, W)`` feature map.
        grid: ``(gh, gw)``, the centers laid on a ``gh x gw`` grid over the map.
        mask: optional ``(..., H, W)`` bool, ``True`` = real pixel. Padding then does not
            dilute the average; a grid cell with no real pixel gets a zero center.

    Returns:
        ``(..., gh * gw, D)`` centers in row-major grid order.
    """
    gh, gw = grid
    *lead, dim, height, width = features.shape
    flat = features.reshape(-1, dim, height, width)
    if mask is None:
        pooled = F.adaptive_avg_pool2d(flat, (gh, gw))
    else:
        weight = mask.reshape(-1, 1, height, width).to(features.dtype)
        total = F.adaptive_avg_pool2d(flat * weight, (gh, gw))
        count = F.adaptive_avg_pool2d(weight, (gh, gw))
        pooled = total / count.clamp_min(_EPS)
    return pooled.flatten(-2).transpose(-1, -2).reshape(*lead, gh * gw, dim)


def _assign(logits: Tensor, q: Tensor, k: Tensor, assignment: str) -> Tensor:
    """Assignment matrix ``(..., K, N)`` from the E-step logits (see the step docstring)."""
    if assignment == "softmax_centers":
        if torch.compiler.is_compiling():
            # exp(log_softmax) when traced: inductor's attention pattern (torch 2.13) treats
            # the softmax dimension as a wildcard and rewrites ``softmax(q @ k^T, dim=-2) @ v``
            # into scaled_dot_product_attention, whose softmax runs over the LAST dimension:
            # compiled results were silently wrong whenever no mask multiply broke the chain
            # (tests/test_compile_correctness.py). Same numbers up to float rounding; eager
            # keeps the single softmax kernel.
            return torch.log_softmax(logits, dim=-2).exp()
        return torch.softmax(logits, dim=-2)
    if assignment == "softmax_pixels":
        return torch.softmax(logits, dim=-1)
    if assignment == "argmax":
        # k-means hard assignment: one-hot over centers, no gradient through the choice.
        best = logits.argmax(dim=-2, keepdim=True)
        centers = torch.arange(logits.shape[-2], device=logits.device).unsqueeze(-1)
        return (centers == best).to(logits.dtype)
    if assignment == "cosine":
        return F.relu(F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2))
    raise ValueError(f"unknown assignment {assignment!r}; expected one of {ASSIGNMENTS}")


def cross_attention_clustering_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    assignment: Assignment = "softmax_centers",
    m_step: MStep = "sum",
    attn_mask: Tensor | None = None,
) -> Tensor:
    r"""One E-step / M-step of cross-attention clustering (the supplement's Eq. 3).

    .. math::
        M = \mathrm{softmax}_K(\text{scale} \cdot q k^\top), \qquad C' = M v

    The softmax runs over the *centers* (``dim=-2``): every pixel spreads one unit of
    assignment mass over the ``K`` centers, as in soft k-means.

    Args:
        q: ``(..., K, d)`` center queries.
        k: ``(..., N, d)`` pixel keys.
        v: ``(..., N, d)`` pixel values.
        scale: logit scale; ``None`` means ``1 / sqrt(d)``.
        mask: optional ``(..., N)`` bool, ``True`` = real pixel. Masked pixels get zero
            assignment to every center, so they never move a center.
        assignment: the E-step. ``"softmax_centers"`` (the paper's), or the Table S1(c)
            ablations: ``"softmax_pixels"`` (vanilla cross-attention, softmax over pixels),
            ``"argmax"`` (k-means hard assignment), ``"cosine"`` (ReLU of the cosine
            similarity between queries and keys).
        m_step: ``"sum"`` (the paper's literal ``M @ v``) or ``"mean"`` (soft k-means:
            divide each center by its total assignment mass).
        attn_mask: optional ``(..., K, N)`` bool, ``True`` = center ``k`` may take pixel
            ``n`` (Mask2Former's masked attention: a center sees only its previous mask).
            A disallowed pair gets zero assignment, and the E-step shares each pixel's mass
            only among the centers allowed to take it; a pixel no center may take moves
            nothing. ``None`` (default) allows every pair.

    Returns:
        ``(..., K, d)`` center updates.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # Scaling the (K, d) queries rather than the (K, N) logits: fewer values, same product.
    logits = (q * scale) @ k.transpose(-1, -2)
    allowed = None if mask is None else mask.unsqueeze(-2)
    if attn_mask is not None:
        allowed = attn_mask if allowed is None else attn_mask & allowed
    if allowed is not None and (assignment == "softmax_pixels" or attn_mask is not None):
        # A softmax must not give mass to a pixel (or pair) that is not allowed: masking the
        # logits keeps the allowed weights summing to one. (Over centers, padding alone needs
        # no fill: each pixel's softmax is its own, and the multiply below zeroes it.)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    weights = _assign(logits, q, k, assignment)
    if allowed is not None:
        weights = weights * allowed.to(weights.dtype)
    if m_step == "mean":
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(_EPS)
    elif m_step != "sum":
        raise ValueError(f"unknown m_step {m_step!r}; expected one of {M_STEPS}")
    return weights @ v


def criss_cross_mask(
    row_start: Tensor, row_end: Tensor, col_start: Tensor, col_end: Tensor,
    size: tuple[int, int],
) -> Tensor:
    r"""Which pixels each center sees under criss-cross attention (CCNet, Huang et al. 2019).

    CCNet lets a pixel attend over the ``H + W - 1`` positions of its own row and column. A
    cluster center owns a band of rows and a band of columns instead (its cell of the
    ``init_centers`` grid, or the single row and column of a reference point): it sees every
    pixel whose row lies in its row band *or* whose column lies in its column band.

    Args:
        row_start, row_end, col_start, col_end: ``(..., K)`` integer tensors, the half-open
            bands ``[start, end)`` of each center in pixels.
        size: ``(H, W)`` of the map.

    Returns:
        ``(..., K, H * W)`` bool, ``True`` = the center may take the pixel (row-major pixels),
        the ``attn_mask`` of :func:`cross_attention_clustering_step`.
    """
    height, width = size
    device = row_start.device
    rows = torch.arange(height, device=device).view(-1, 1).expand(height, width).reshape(-1)
    cols = torch.arange(width, device=device).view(1, -1).expand(height, width).reshape(-1)
    in_row = (rows >= row_start.unsqueeze(-1)) & (rows < row_end.unsqueeze(-1))
    in_col = (cols >= col_start.unsqueeze(-1)) & (cols < col_end.unsqueeze(-1))
    return in_row | in_col


def grid_cells(grid: tuple[int, int], size: tuple[int, int]) -> tuple[Tensor, ...]:
    """The pixel bands of the cells :func:`init_centers` pools, ``(gh * gw,)`` each.

    Adaptive average pooling's cells: row band ``i`` is ``[floor(i H / gh), ceil((i + 1) H /
    gh))`` (neighbouring bands overlap by a pixel when ``gh`` does not divide ``H``), and the
    same over columns. Returns ``row_start, row_end, col_start, col_end`` in row-major grid
    order, ready for :func:`criss_cross_mask`.
    """
    (gh, gw), (height, width) = grid, size
    rows = torch.arange(gh)
    cols = torch.arange(gw)
    row_start, row_end = (rows * height) // gh, -((-(rows + 1) * height) // gh)
    col_start, col_end = (cols * width) // gw, -((-(cols + 1) * width) // gw)
    return (row_start.repeat_interleave(gw), row_end.repeat_interleave(gw),
            col_start.repeat(gh), col_end.repeat(gh))  # fmt: skip


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(..., L, D)`` -> ``(..., h, L, D / h)``."""
    *lead, length, dim = x.shape
    return x.reshape(*lead, length, num_heads, dim // num_heads).transpose(-3, -2)


def _keys_and_values(
    features: Tensor, params: Mapping[str, Tensor | None], num_heads: int
) -> tuple[Tensor, Tensor]:
    """K and V of every head, ``(..., h, N, d)`` each, contiguous.

    One matmul with the stacked ``[W_k; W_v]`` weights, then one copy into the per-head
    layout; the clustering iterations then reuse K and V without re-laying them out (a
    per-head view of a (..., N, D) projection is copied by every matmul that reads it).
    """
    k_bias, v_bias = params.get("k_bias"), params.get("v_bias")
    if params["k_weight"].shape[0] != params["v_weight"].shape[0]:
        # Query/key heads narrower or wider than the value heads (a head dimension of its own):
        # the stacked projection needs equal widths, so project the two separately.
        keys = _split_heads(linear(features, params["k_weight"], k_bias), num_heads)
        values = _split_heads(linear(features, params["v_weight"], v_bias), num_heads)
        return keys.contiguous(), values.contiguous()
    bias = None
    if k_bias is not None or v_bias is not None:
        dim = params["k_weight"].shape[0]
        zeros = params["k_weight"].new_zeros(dim)
        bias = torch.cat([zeros if k_bias is None else k_bias, zeros if v_bias is None else v_bias])
    kv = linear(features, torch.cat([params["k_weight"], params["v_weight"]]), bias)
    *lead, length, width = kv.shape
    kv = kv.reshape(*lead, length, 2, num_heads, width // (2 * num_heads))
    kv = kv.movedim(-3, 0).movedim(-2, -3).contiguous()  # (2, ..., h, N, d)
    # unbind, not kv[0] and kv[1]: its backward stacks the two gradients in one copy, where
    # two selects each wrote a zero-filled (2, ..., h, N, d) gradient and then summed them.
    keys, values = kv.unbind(0)
    return keys, values


def recurrent_cross_attention_clustering(
    features: Tensor,
    centers: Tensor,
    params: Mapping[str, Tensor | None],
    *,
    num_iters: int,
    num_heads: int = 1,
    scale: float | None = None,
    mask: Tensor | None = None,
    assignment: Assignment = "softmax_centers",
    m_step: MStep = "sum",
    attn_mask: Tensor | None = None,
) -> Tensor:
    r"""Recurrent cross-attention clustering (the supplement's Algorithm 1 / Eq. 4).

    Keys and values are projected from the pixels once; then ``num_iters`` times the
    centers are projected to queries with the *same* weights and updated residually::

        K, V = lin(features, k), lin(features, v)
        for t in range(num_iters):
            C = C + heads_concat(step(lin(C, q)_h, K_h, V_h))

    Args:
        features: ``(..., N, D)`` pixel features.
        centers: ``(..., K, D)`` initial centers ``C0``.
        params: ``q_weight``, ``k_weight``, ``v_weight`` of shape ``(D, D)`` in
            ``nn.Linear`` layout (``out x in``) and ``q_bias``, ``k_bias``, ``v_bias`` of
            shape ``(D,)`` or ``None`` (a missing bias key also means ``None``). The query and
            key weights may instead both be ``(h * d_k, D)`` (biases ``(h * d_k,)``): the
            E-step then compares ``d_k``-channel heads while each value head keeps ``D / h``
            channels (Table S1d's head dimension without changing ``D``). ``q_bias`` is not
            applied when ``assignment`` is over centers (``ASSIGNMENTS_OVER_CENTERS``), where
            it cancels exactly.
        num_iters: ``T``, the number of recurrent updates; ``0`` returns ``C0``.
        num_heads: ``h``; ``D`` must be divisible by it. Each head clusters on its own
            ``D / h`` channels and the updates are concatenated.
        scale: logit scale; ``None`` means ``1 / sqrt(d_k)`` (``d_k = D / h`` by default).
        mask: optional ``(..., N)`` bool, ``True`` = real pixel; padding never moves a center.
        assignment, m_step: see :func:`cross_attention_clustering_step`.
        attn_mask: optional ``(..., K, N)`` bool, the same for every head and iteration:
            center ``k`` only takes pixels ``n`` with ``attn_mask[..., k, n]`` (see
            :func:`cross_attention_clustering_step`).

    Returns:
        ``(..., K, D)`` centers ``C_T``; float32 when it trains under autocast.

    When gradients flow through it under autocast, the whole recurrence (projections and both
    steps) runs in float32, as autocast runs its own precision-sensitive ops (softmax, norms)
    in float32. At trained weights the assignments are sharp and T updates compound them:
    rounding inside the recurrence to bfloat16 moved a trained nano's mixer outputs by 5-15 %
    and made its gradients noise, and bf16 training stalled. Without gradients (inference)
    it stays in the autocast dtype: the same rounding left trained classifiers' top-1 as in
    float32 (docs/benchmarks.md, "bf16 training on the CPU"). "Gradients flow" means grad
    mode is on and an input requires grad; ``torch.func.grad`` counts, but inside a plain
    ``torch.func.vmap`` inputs do not show that they require grad.
    """
    if features.shape[-1] % num_heads or params["q_weight"].shape[0] % num_heads:
        raise ValueError(f"channels {features.shape[-1]} (query/key "
                         f"{params['q_weight'].shape[0]}) not divisible by {num_heads} heads")
    device_type = features.device.type
    if (_needs_grad(features, centers, *params.values())
            and torch.amp.is_autocast_available(device_type)  # not "meta" (cf models)
            and torch.is_autocast_enabled(device_type)):
        with torch.autocast(device_type, enabled=False):
            return recurrent_cross_attention_clustering(
                features.float(), centers.float(),
                {name: None if value is None else value.float() for name, value in params.items()},
                num_iters=num_iters, num_heads=num_heads, scale=scale, mask=mask,
                assignment=assignment, m_step=m_step, attn_mask=attn_mask,
            )
    keys, values = _keys_and_values(features, params, num_heads)
    head_mask = None if mask is None else mask.unsqueeze(-2)
    head_attn = None if attn_mask is None else attn_mask.unsqueeze(-3)
    # A query bias cancels in an assignment over centers (ASSIGNMENTS_OVER_CENTERS): it is left
    # out, which changes no result and keeps ``b . k_n`` out of low-precision logits (docs/
    # benchmarks.md, "bf16 training on the CPU").
    q_bias = None if assignment in ASSIGNMENTS_OVER_CENTERS else params.get("q_bias")
    out = centers
    for _ in range(num_iters):
        queries = _split_heads(linear(out, params["q_weight"], q_bias), num_heads)
        update = cross_attention_clustering_step(
            queries, keys, values, scale=scale, mask=head_mask,
            assignment=assignment, m_step=m_step, attn_mask=head_attn,
        )
        # Residual add through the heads' view: no separate copy merging the heads.
        out = (out.unflatten(-1, (num_heads, -1)) + update.transpose(-3, -2)).flatten(-2)
    return out


def dispatch_similarity(features: Tensor, centers: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``sigmoid(beta + alpha * cos_sim(centers, features))``: ``(..., K, N)``.

    Args:
        features: ``(..., N, D)``; centers: ``(..., K, D)``; alpha, beta: scalar tensors.
    """
    cosine = F.normalize(centers, dim=-1) @ F.normalize(features, dim=-1).transpose(-1, -2)
    return torch.sigmoid(beta + alpha * cosine)


def keep_best_center(similarity: Tensor) -> Tensor:
    """Zero every entry of ``(..., K, N)`` but each pixel's (column's) largest one."""
    best = similarity.argmax(dim=-2, keepdim=True)
    index = torch.arange(similarity.shape[-2], device=similarity.device).unsqueeze(-1)
    return similarity * (index == best).to(similarity.dtype)


def dispatch_update(features: Tensor, centers: Tensor, *, alpha: Tensor, beta: Tensor) -> Tensor:
    r"""What feature dispatching sends each pixel, before its MLP (the supplement's Eq. 6)::

        S = sigmoid(beta + alpha * cos_sim(centers, features))      # (..., K, N)
        S_kn = S_kn if k == argmax_k S_kn else 0
        returns (1 / K) * sum_k S_kn * C_k                           # (..., N, D)

    Args:
        features: ``(..., N, D)`` pixel features; centers: ``(..., K, D)``; alpha, beta:
            scalar tensors.

    Returns:
        ``(..., N, D)``.
    """
    # The cosine divides by the pixel norms instead of normalising the features, which would
    # write a normalised copy of the whole (..., N, D) map: c . x / |x| equals
    # c . F.normalize(x), with F.normalize's eps.
    unit_centers = F.normalize(centers, dim=-1)
    norms = torch.linalg.vector_norm(features, dim=-1).clamp_min(1e-12).unsqueeze(-2)
    cosine = (unit_centers @ features.transpose(-1, -2)) / norms  # (..., K, N)
    weights = keep_best_center(torch.sigmoid(beta + alpha * cosine))
    # 1/K on the small (K, N) weights, not on the (N, D) result.
    return (weights / centers.shape[-2]).transpose(-1, -2) @ centers


def feature_dispatching(
    features: Tensor,
    centers: Tensor,
    *,
    alpha: Tensor,
    beta: Tensor,
    mlp: Callable[[Tensor], Tensor],
) -> Tensor:
    r"""Feature dispatching (the supplement's Algorithm 2 / Eq. 6).

    Each pixel receives its most similar center, weighted by a learned sigmoid of the
    cosine similarity::

        S = sigmoid(beta + alpha * cos_sim(centers, features))      # (..., K, N)
        S_kn = S_kn if k == argmax_k S_kn else 0
        out = features + mlp((1 / K) * sum_k S_kn * C_k)

    Args:
        features: ``(..., N, D)`` pixel features.
        centers: ``(..., K, D)`` cluster centers.
        alpha: scalar tensor, similarity scale.
        beta: scalar tensor, similarity shift.
        mlp: callable mapping ``(..., N, D)`` to ``(..., N, D)``, applied per pixel.

    Returns:
        ``(..., N, D)`` updated features.
    """
    return features + mlp(dispatch_update(features, centers, alpha=alpha, beta=beta))
