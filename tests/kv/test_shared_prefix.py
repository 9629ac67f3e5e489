"""K11 Hydragen: shared-prefix attention equals dense attention over each sequence's ``[prefix; suffix]`` (fp64;
ragged suffixes, GQA, one decode query and chunked prefill; both paths, with gradients), the two-level tree equals the
same keys as one level, ``auto`` picks a path by the documented rule, bad input names its argument."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.kernels import parts
from attnzoo.kernels.dense import softmax_attention_lse
from attnzoo.kv import shared_prefix_attention, tree_prefix_attention
from attnzoo.kv.shared_prefix import AUTO_MIN_BATCH, AUTO_MIN_SHARED_KEYS
from tests.helpers import one_thread


def _inputs(b=3, h=4, hkv=2, sq=1, p=7, s=6, d=8, ragged=True, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    mask = None
    if ragged:
        lengths = torch.tensor([s, max(sq, s - 2), max(sq, s - 3)][:b] + [s] * max(0, b - 3))
        mask = torch.arange(s) < lengths.unsqueeze(1)
        mask[1] = mask[1].flip(0)  # padding on the left of sequence 1: padding may sit anywhere
    return r(b, h, sq, d), r(1, hkv, p, d), r(1, hkv, p, d), r(b, hkv, s, d), r(b, hkv, s, d), mask


def _reference(q, pk, pv, sk, sv, mask):
    """Dense attention per sequence over its own [prefix; real suffix] with bottom-right causal alignment."""
    outs = []
    for i in range(q.shape[0]):
        real = slice(None) if mask is None else mask[i]
        k = torch.cat([pk[0], sk[i][:, real]], dim=1).unsqueeze(0)
        v = torch.cat([pv[0], sv[i][:, real]], dim=1).unsqueeze(0)
        sq, n = q.shape[2], k.shape[2]
        causal = torch.ones(sq, n, dtype=torch.bool).tril(n - sq)
        outs.append(softmax_attention_lse(q[i : i + 1], k, v, q.shape[-1] ** -0.5, causal)[0])
    return torch.cat(outs)


@pytest.mark.parametrize("path", ["shared", "plain"])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("ragged", [False, True])
def test_equals_dense_attention_over_prefix_and_suffix(path, sq, ragged):
    args = _inputs(sq=sq, ragged=ragged)
    out, taken = shared_prefix_attention(*args, path=path, return_path=True)
    assert taken == path
    torch.testing.assert_close(out, _reference(*args))


@pytest.mark.parametrize("path", ["shared", "plain"])
def test_gradients_match_dense_attention(path):
    q, pk, pv, sk, sv, mask = _inputs(sq=2, grad=True)
    out = shared_prefix_attention(q, pk, pv, sk, sv, mask, path=path)
    want = _reference(q, pk, pv, sk, sv, mask)
    probe = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out * probe).sum(), (q, pk, pv, sk, sv))
    refs = torch.autograd.grad((want * probe).sum(), (q, pk, pv, sk, sv))
    for got, ref in zip(grads, refs, strict=True):
        torch.testing.assert_close(got, ref)


def test_flash_prefix_call_in_fp32_matches_dense():
    q, pk, pv, sk, sv, mask = (x if x is None or x.dtype == torch.bool else x.float() for x in _inputs(b=5, p=40))
    with torch.no_grad():
        out = shared_prefix_attention(q, pk, pv, sk, sv, mask, path="shared")
    torch.testing.assert_close(out, _reference(q, pk, pv, sk, sv, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_onednn_prefix_products_in_fp32_match_dense(monkeypatch, chunk_rows):
    """With enough scores per KV head (the threshold lowered here) the prefix takes the oneDNN GEMM path, in chunks
    of rows when the score budget is small; the result is still exact attention (GQA: 2 groups × 9 sequences × 2
    queries stacked per KV head; ragged suffixes)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not built into this torch")
    args = [x if x is None or x.dtype == torch.bool else x.float() for x in _inputs(b=9, sq=2, p=40)]
    calls = []
    gemm = parts._onednn_linear
    monkeypatch.setattr(parts, "_onednn_linear", lambda x, w: calls.append(x.shape[0]) or gemm(x, w))
    with torch.no_grad(), one_thread():
        shared_prefix_attention(*args, path="shared")
        assert not calls  # 36 × 40 scores per KV head: below the threshold, the flash kernel
        monkeypatch.setattr(parts, "GEMM_MIN_SCORES", 36 * 40)
        if chunk_rows is not None:
            monkeypatch.setattr(parts, "GEMM_SCORES", chunk_rows * 40)
        out = shared_prefix_attention(*args, path="shared")
    assert calls and max(calls) == (chunk_rows or 36)
    torch.testing.assert_close(out, _reference(*args), atol=1e-5, rtol=1e-5)


def test_auto_shares_a_long_prefix_across_a_large_batch_only():
    def taken(b, p):
        return shared_prefix_attention(*_inputs(b=b, p=p, ragged=False), path="auto", return_path=True)[1]

    prefix = AUTO_MIN_SHARED_KEYS // AUTO_MIN_BATCH
    assert taken(AUTO_MIN_BATCH, prefix) == "shared"
    assert taken(AUTO_MIN_BATCH - 1, AUTO_MIN_SHARED_KEYS) == "plain"
    assert taken(AUTO_MIN_BATCH, prefix - 1) == "plain"


@pytest.mark.parametrize(("batch", "prefix", "path"), [
    (64, 8192, "shared"), (8, 1024, "shared"), (64, 256, "shared"), (4, 256, "shared"),
    (2, 256, "plain"), (4, 64, "plain"), (1, 4096, "plain"),
])
def test_auto_takes_the_faster_path_on_the_measured_shapes(batch, prefix, path):
    """The shapes of the module docstring's measurements: shared wherever it beat the plain path."""
    args = _inputs(b=batch, p=prefix, d=4, ragged=False)
    assert shared_prefix_attention(*args, path="auto", return_path=True)[1] == path


@pytest.mark.parametrize(("change", "argument"), [
    (lambda a: {**a, "path": "fast"}, "path"),
    (lambda a: {**a, "prefix_k": a["prefix_k"].expand(2, -1, -1, -1)}, "prefix_k"),
    (lambda a: {**a, "suffix_v": a["suffix_v"][:, :, :-1]}, "suffix_v"),
    (lambda a: {**a, "suffix_mask": torch.zeros(3, 6, dtype=torch.bool)}, "suffix_mask"),
])
def test_bad_input_names_the_argument(change, argument):
    q, pk, pv, sk, sv, mask = _inputs()
    args = {"q": q, "prefix_k": pk, "prefix_v": pv, "suffix_k": sk, "suffix_v": sv, "suffix_mask": mask}
    with pytest.raises(az.AttnzooError, match=argument):
        shared_prefix_attention(**change(args))


@pytest.mark.parametrize("grad", [False, True])
def test_two_level_tree_equals_dense_attention_over_prefix_group_prefix_and_suffix(grad):
    q, pk, pv, sk, sv, mask = _inputs(b=4, sq=2, grad=grad)
    g = torch.Generator().manual_seed(5)
    gk = torch.randn(3, 2, 5, 8, generator=g, dtype=torch.float64).requires_grad_(grad)
    gv = torch.randn(3, 2, 5, 8, generator=g, dtype=torch.float64).requires_grad_(grad)
    groups = torch.tensor([2, 0, 2, 0])  # group 1 is empty
    out = tree_prefix_attention(q, pk, pv, gk, gv, groups, sk, sv, mask)
    # the same keys as a one-level problem: each sequence's group prefix moved in front of its suffix
    one_level_k = torch.cat([gk[groups], sk], dim=2)
    one_level_v = torch.cat([gv[groups], sv], dim=2)
    one_level_mask = torch.cat([torch.ones(4, 5, dtype=torch.bool), mask], dim=1)
    want = _reference(q, pk, pv, one_level_k, one_level_v, one_level_mask)
    torch.testing.assert_close(out, want)
    if grad:
        grads = torch.autograd.grad(out.sum(), (q, pk, gk, gv, sv))
        refs = torch.autograd.grad(want.sum(), (q, pk, gk, gv, sv))
        for got, ref in zip(grads, refs, strict=True):
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize(("groups", "argument"), [(torch.tensor([0, 1, 3]), "groups"),
                                                  (torch.tensor([0.0, 1.0, 1.0]), "groups")])
def test_tree_bad_groups_name_the_argument(groups, argument):
    q, pk, pv, sk, sv, mask = _inputs()
    with pytest.raises(az.AttnzooError, match=argument):
        tree_prefix_attention(q, pk, pv, torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8), groups, sk, sv, mask)
