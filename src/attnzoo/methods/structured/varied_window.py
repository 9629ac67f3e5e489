"""P14 — varied-size window attention (VSA): each head's window is rescaled and shifted by a learned regression.

Paper: "VSA: Learning Varied-Size Window Attention in Vision Transformers" (Zhang et al., arXiv:2204.08446). Used the
paper's description (window regression from the pooled default window, keys/values sampled bilinearly inside the
target window, zero padding, per head); the code here is written anew.

Formula as implemented: the sequence is a row-major ``(h, w) = layout`` grid (``None``: ``(1, seq)``) cut into
default windows of ``window_size = (P_h, P_w)`` (an int ``P`` means ``(P, P)``, or ``(1, P)`` when ``layout`` is
None), which must divide the grid. For head ``n`` and window ``u``:

1. window regression: ``r = LeakyReLU_0.01(mean_{i∈u} q_i) · R_n`` with ``R = window_regression (H, D, 4)``, giving
   ``(s_y, s_x, o_y, o_x) = r`` (choice: VSA regresses from the layer input ``x``; here from the window's pooled
   queries, which are a linear function of it, so the regression weights can live in the attention method);
2. target window: the default window's token ``(a, b)`` (relative to the window centre ``c``) becomes the sampling
   point ``c + (a·(1 + s_y) + o_y·P_h, b·(1 + s_x) + o_x·P_w)`` — scale relative to the default size, offset in
   window sizes;
3. keys and values at the ``P_h·P_w`` sampling points are bilinear interpolations of K and V on the grid, zero outside
   it (VSA's zero padding);
4. each query of window ``u`` attends with softmax to its window's sampled keys: ``O = softmax(scale · q·k̃) ṽ``.

With ``window_regression`` zero (its ``nn`` initialisation, or ``None``) every sampling point is a token of the default
window and this is exactly non-overlapping window attention (P5 ``maxvit_block``, P8 ``halo`` with ``halo_size=0``).
Self-attention, non-causal, no user mask or bias (the keys are sampled points, not sequence positions); GQA: head ``n``
samples from key/value head ``n // (H / Hkv)``. Gradients flow to q, k, v and ``window_regression``; at sampling
points that fall exactly on grid lines bilinear interpolation has a kink and the two implementations may pick
different one-sided gradients there.

Fast path ``torch`` (:func:`torch_sampled_windows`): keys and values are sampled together by one ``grid_sample`` call
(O(N·d) per head) and each window runs one batched SDPA over its ``P_h·P_w`` samples: O(N·P_h·P_w·d) time, O(N·d)
memory. The reference builds the dense ``N × N`` interpolation weights from the tent kernel and masks the ``N × N``
scores to each query's window.

No log-sum-exp (``return_lse``): the softmax runs over keys sampled between tokens (bilinear mixtures of the call's
keys), not over the call's keys, so attention over a split of the keys would not merge into it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.methods.common import repeat_kv, safe_softmax
from attnzoo.registry import Backend, Call, LayerInfo, MethodSpec, Param, TestHints, register

Geometry = tuple[int, int, int, int]  # h, w, P_h, P_w


def _geometry(seq: int, layout: Any, window_size: Any) -> Geometry:
    if layout is None:
        h, w = 1, seq
        ph, pw = window_size if isinstance(window_size, tuple) else (1, window_size)
    else:
        h, w = layout
        ph, pw = window_size if isinstance(window_size, tuple) else (window_size, window_size)
    return h, w, ph, pw


def _check_layout(value: Any, call: Call) -> str | None:
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
        return "a tuple (h, w) of two positive ints"
    if value[0] * value[1] != call.seq_q:
        return f"a grid of seq = {call.seq_q} tokens"
    return None


def _check_window(value: Any, call: Call) -> str | None:
    if isinstance(value, tuple) and (len(value) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
        return "an int or a tuple (P_h, P_w) of positive ints"
    layout = call.params.get("layout")
    if layout is not None and _check_layout(layout, call) is not None:
        return None  # the layout's own check reports it
    h, w, ph, pw = _geometry(call.seq_q, layout, value)
    if h % ph or w % pw:
        return f"window sizes dividing the grid {(h, w)}"
    return None


def _check_regression(value: Any, call: Call) -> str | None:
    if not value.is_floating_point():
        return "a floating-point tensor"
    if value.shape != (call.heads, call.head_dim, 4):
        return f"shape (heads, head_dim, 4) = ({call.heads}, {call.head_dim}, 4)"
    return None


def _init_regression(info: LayerInfo) -> torch.Tensor:
    return torch.zeros(info.heads, info.head_dim, 4)


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    a = next((d for d in range(2, call.seq_q) if call.seq_q % d == 0), call.seq_q)
    reg = 0.3 * torch.randn(call.heads, call.head_dim, 4, generator=generator, dtype=torch.float64)
    return {"layout": (a, call.seq_q // a), "window_size": (a, 1), "window_regression": reg}


SPEC = MethodSpec(
    name="varied_window",
    family="structured",
    mechanism="P14",
    paper="VSA: Learning Varied-Size Window Attention in Vision Transformers",
    arxiv="2204.08446",
    summary="window attention whose key/value window is rescaled and shifted per head by a learned regression",
    exact=True,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("window_size", (int, tuple), 7, "default window (P_h, P_w), or P; must divide the grid", low=1,
              check=_check_window),
        Param("layout", (tuple,), None, "(h, w) grid of the sequence; None means (1, seq)", check=_check_layout),
        Param("window_regression", (torch.Tensor,), None,
              "learnable (H, head_dim, 4) map from pooled window queries to (scale_y, scale_x, offset_y, offset_x); "
              "None: zero (plain window attention)", check=_check_regression, init=_init_regression),
    ),
    complexity="O(N·P_h·P_w·d) time, O(N·d) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window_size: Any, layout: Any, window_regression: torch.Tensor | None,
) -> torch.Tensor:
    _, heads, n, _ = q.shape
    h, w, ph, pw = _geometry(n, layout, window_size)
    y = torch.arange(n, device=q.device) // w
    x = torch.arange(n, device=q.device) % w
    win = (y // ph) * (w // pw) + x // pw  # each token's default window
    member = (win.unsqueeze(0) == torch.arange((h // ph) * (w // pw), device=q.device).unsqueeze(1)).to(q.dtype)
    pooled = (member @ q) / (ph * pw)  # (B, H, windows, D)
    if window_regression is None:
        deltas = torch.zeros(*pooled.shape[:3], 4, dtype=q.dtype, device=q.device)
    else:
        deltas = torch.einsum("bnud,ndr->bnur", F.leaky_relu(pooled, 0.01), window_regression)
    d = deltas[:, :, win]  # (B, H, N, 4): the sampling point of token i's slot in its own window
    cy, cx = (y // ph) * ph + (ph - 1) / 2, (x // pw) * pw + (pw - 1) / 2
    sy = cy + (y - cy) * (1 + d[..., 0]) + d[..., 2] * ph
    sx = cx + (x - cx) * (1 + d[..., 1]) + d[..., 3] * pw
    tent = (torch.relu(1 - (sy.unsqueeze(-1) - y).abs()) * torch.relu(1 - (sx.unsqueeze(-1) - x).abs()))
    k_s, v_s = tent @ repeat_kv(k, heads), tent @ repeat_kv(v, heads)  # sampled keys/values, one per slot
    s = scale * q @ k_s.transpose(-1, -2)
    return safe_softmax(s, win.unsqueeze(1) == win.unsqueeze(0)) @ v_s


def _windows(t: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``(B, H, N, C)`` → ``(B, H, windows, P_h·P_w, C)``, windows and their tokens in row-major order."""
    h, w, ph, pw = g
    b, n_h, _, c = t.shape
    t = t.reshape(b, n_h, h // ph, ph, w // pw, pw, c).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(b, n_h, (h // ph) * (w // pw), ph * pw, c)


def _unwindows(t: torch.Tensor, g: Geometry) -> torch.Tensor:
    h, w, ph, pw = g
    b, n_h, _, _, c = t.shape
    t = t.reshape(b, n_h, h // ph, w // pw, ph, pw, c).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(b, n_h, h * w, c)


def _bilinear(t: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear samples of ``t (B, H, h·w, C)`` at points ``(sy, sx) (B, H, M)``, zero outside the grid.

    ``grid_sample`` on the grid padded with one ring of zeros (so that no axis has length 1, and ``align_corners``
    maps padded pixel ``p`` to ``−1 + 2p / (L + 1)``): the same as zero outside the unpadded grid."""
    b, heads, _, c = t.shape
    img = F.pad(t.transpose(-1, -2).reshape(b * heads, c, h, w), (1, 1, 1, 1))
    grid = torch.stack([(sx + 1) * (2 / (w + 1)) - 1, (sy + 1) * (2 / (h + 1)) - 1], dim=-1)
    out = F.grid_sample(img, grid.reshape(b * heads, 1, -1, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=True)  # (B·H, C, 1, M)
    return out.view(b, heads, c, -1).transpose(-1, -2)


def torch_sampled_windows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window_size: Any, layout: Any, window_regression: torch.Tensor | None,
) -> torch.Tensor:
    b, heads, n, _ = q.shape
    g = _geometry(n, layout, window_size)
    h, w, ph, pw = g
    qw = _windows(q, g)  # (B, H, U, P, D)
    if window_regression is None:
        out = _window_sdpa(qw, _windows(k, g), _windows(v, g), scale)
        return _unwindows(out, g)
    deltas = torch.einsum("bnud,ndr->bnur", F.leaky_relu(qw.mean(dim=3), 0.01), window_regression)
    # Relative slot coordinates inside a window and the windows' centres, in grid units.
    ry = torch.arange(ph, device=q.device, dtype=q.dtype).repeat_interleave(pw) - (ph - 1) / 2
    rx = torch.arange(pw, device=q.device, dtype=q.dtype).repeat(ph) - (pw - 1) / 2
    cy = (torch.arange(h // ph, device=q.device, dtype=q.dtype) * ph + (ph - 1) / 2).repeat_interleave(w // pw)
    cx = (torch.arange(w // pw, device=q.device, dtype=q.dtype) * pw + (pw - 1) / 2).repeat(h // ph)
    d = deltas.unsqueeze(3)  # (B, H, U, 1, 4)
    sy = cy.view(-1, 1) + ry * (1 + d[..., 0]) + d[..., 2] * ph  # (B, H, U, P)
    sx = cx.view(-1, 1) + rx * (1 + d[..., 1]) + d[..., 3] * pw
    kv = torch.cat([k, v], dim=-1)  # keys and values share their sampling points: one read for both
    kv = kv.repeat_interleave(heads // k.shape[1], dim=1)  # each query head samples its own points
    m = sy.shape[2] * sy.shape[3]
    kvs = _bilinear(kv, sy.reshape(b, heads, m), sx.reshape(b, heads, m), h, w).view(*qw.shape[:4], -1)
    ks, vs = kvs[..., : k.shape[-1]], kvs[..., k.shape[-1] :]
    return _unwindows(_window_sdpa(qw, ks, vs, scale), g)


def _window_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA per window of ``(B, H, U, P, C)`` tensors, as 4-D ``(B·U, H, P, C)`` calls (CPU SDPA is much slower on
    5-D inputs); GQA reads the shared K/V heads without copies."""
    b, h, u, p, _ = q.shape

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(b * u, t.shape[1], p, t.shape[-1])

    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), scale=scale, enable_gqa=h != k.shape[1])
    return out.view(b, u, h, p, -1).transpose(1, 2)


register(SPEC, reference, [Backend("torch", torch_sampled_windows)])
