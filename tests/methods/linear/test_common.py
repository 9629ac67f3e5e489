"""Checks across the L family: the registered decoders (``prefill``/``step`` on raw states) against the
parallel and chunked forwards, long sequences stay finite, bf16 training through the hand-written backwards, and bad
feature maps, decays, gates and states refused. What is particular to one method is in its own file."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import F64, decode_each_token, decoding, eco_params, qkv, token, with_gates

CASES = [
    ("linear", {"feature_map": "elu1"}),
    ("linear", {"feature_map": "relu"}),
    ("linear", {"feature_map": "identity", "normalize": False}),
    ("linear", {"feature_map": "softmax_kernel", "num_features": 24, "seed": 3}),
    ("linear", {"feature_map": lambda x: torch.sigmoid(x).repeat(1, 1, 1, 2)}),
    ("lightning", {"decay": 0.3}),
    ("lightning", {}),
    ("gated_delta", {}),
    ("gated_delta", {"qk_l2norm": False, "beta": 0.1}),
    ("gated_delta", {"gates": True}),
    ("inline", {}),
]
MODULES = {name: decoding(name) for name in ("linear", "lightning", "gated_delta", "inline")}
CHUNK_PARAM = {"linear": "chunk_size", "lightning": "block_size", "gated_delta": "chunk_size", "inline": "chunk_size"}


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize(("n", "chunk"), [(37, 8), (5, 16), (32, 8)])
def test_parallel_chunked_recurrent_agree(method: str, params: dict, n: int, chunk: int) -> None:
    q, k, v = qkv(2, 4, 2, n, 6, 5)
    for t in (q, k, v):
        t.requires_grad_(True)
    params = with_gates({**params, CHUNK_PARAM[method]: chunk}, 2, 4, n)
    ref = az.attention(q, k, v, method=method, causal=True, backend="reference", **params)
    fast = az.attention(q, k, v, method=method, causal=True, backend="torch", **params)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-9)

    mod = MODULES[method]
    out, state = mod.prefill(q, k, v, **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    decoded, rec_state = decode_each_token(mod, q, k, v, params)
    torch.testing.assert_close(decoded, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(rec_state, state, atol=1e-10, rtol=1e-9)

    w = torch.randn_like(ref)
    grads = [torch.autograd.grad((o * w).sum(), (q, k, v)) for o in (ref, fast, decoded)]
    for g_fast, g_rec, g_ref in zip(grads[1], grads[2], grads[0], strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-9, rtol=1e-8)
        torch.testing.assert_close(g_rec, g_ref, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize(("method", "params"), [CASES[0], CASES[5], CASES[-1]])
def test_prefill_then_decode_equals_full_forward(method: str, params: dict) -> None:
    q, k, v = qkv(1, 4, 1, 50, 8, 8, seed=1)
    params = with_gates(dict(params), 1, 4, 50)
    full = az.attention(q, k, v, method=method, causal=True, **params)
    mod = MODULES[method]
    prompt = {name: p[:, :, :41] if isinstance(p, torch.Tensor) and p.dim() == 3 else p for name, p in params.items()}
    out, state = mod.prefill(q[:, :, :41], k[:, :, :41], v[:, :, :41], **prompt)
    outs = [out]
    for t in range(41, 50):
        o_t, state = mod.step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], **token(params, t))
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("linear", {"feature_map": "elu1"}),
        ("linear", {"feature_map": "relu"}),
        ("lightning", {"decay": 0.01}),
        ("gated_delta", {"beta": 0.5}),
        ("inline", {}),
    ],
)
def test_long_sequences_stay_finite(dtype: torch.dtype, method: str, params: dict) -> None:
    q, k, v = qkv(1, 2, 1, 65536, 8, 8, seed=6, dtype=dtype)
    q[:, :, :100] = -1.0  # relu: rows with all-zero features must give 0, not NaN
    out = az.attention(q, k, v, method=method, causal=True, **params)
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    if params.get("feature_map") == "relu":
        assert bool((out[:, :, :100] == 0).all())


@pytest.mark.parametrize(("method", "params"), [("linear", {}), ("lightning", {"decay": 0.05}), ("nala", {})])
def test_half_precision_training_matches_fp32(method: str, params: dict) -> None:
    """bf16 through the hand-written backward: computed in fp32 inside, gradients finite and close to fp32's."""
    inputs = [t.bfloat16() for t in qkv(1, 4, 2, 300, 16, 16, seed=8, dtype=torch.float32)]
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):  # the same (bf16-representable) values in both runs
        q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
        out = az.attention(q, k, v, method=method, causal=True, **params)
        assert out.dtype == dtype
        grads[dtype] = torch.autograd.grad((out.float() * torch.linspace(-1, 1, 16)).sum(), (q, k, v))
    for lo, hi in zip(grads[torch.bfloat16], grads[torch.float32], strict=True):
        assert lo.dtype == torch.bfloat16 and bool(torch.isfinite(lo).all())
        # bf16 rounding of the output, of its incoming gradient and of the results: 1 % of the gradient's scale
        torch.testing.assert_close(lo.float(), hi, atol=1e-2 * float(hi.abs().max()), rtol=1e-2)


def test_bad_feature_maps_and_states_are_refused() -> None:
    q, k, v = qkv(1, 2, 2, 8, 4, 4)
    with pytest.raises(AttnzooError, match="feature_map"):
        az.attention(q, k, v, method="linear", feature_map="identity")
    with pytest.raises(AttnzooError, match="feature_map"):
        az.attention(q, k, v, method="linear", feature_map="nope")
    with pytest.raises(AttnzooError, match="feature_map"):
        az.attention(q, k, v, method="linear", feature_map=lambda x: x)
    with pytest.raises(AttnzooError, match="decay"):
        az.attention(q, k, v, method="lightning", causal=True, decay=torch.tensor([0.1, -0.1], dtype=F64))
    with pytest.raises(AttnzooError, match="decay"):
        az.attention(q, k, v, method="lightning", causal=True, decay=torch.zeros(3, dtype=F64))
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="lightning", causal=False)
    with pytest.raises(AttnzooError, match="log_gate"):
        az.attention(q, k, v, method="gated_delta", causal=True, log_gate=torch.ones(1, 2, 8, dtype=F64))
    with pytest.raises(AttnzooError, match="beta"):
        az.attention(q, k, v, method="gated_delta", causal=True, beta=torch.ones(1, 2, 7, dtype=F64))
    with pytest.raises(AttnzooError, match="mask"):
        az.attention(q, k, v, method="linear", mask=torch.ones(8, 8, dtype=torch.bool))
    linear = decoding("linear")
    _, state = linear.prefill(q, k, v)
    with pytest.raises(AttnzooError, match="q"):
        linear.step(state, q[:, :, :2], k[:, :, :2], v[:, :, :2])
    with pytest.raises(AttnzooError, match="state"):
        linear.step(state[..., :-1], q[:, :, :1], k[:, :, :1], v[:, :, :1])


# --- the hashed (EcoFormer) and norm-aware (NaLaFormer) methods -----------------------------------------------------

HASHED_AND_NORMED = [
    ("nala", decoding("nala"), lambda gen: {"alpha": 2.0}),
    ("ecoformer", decoding("ecoformer"), eco_params),
]


@pytest.mark.parametrize(("name", "module", "make"), HASHED_AND_NORMED)
def test_reference_chunked_prefill_step_agree(name: str, module: Any, make: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv(2, 4, 2, 23, 6, 3, seed=gen)
    params = {**make(gen), "chunk_size": 5}  # 5 does not divide 23
    ref = az.attention(q, k, v, method=name, causal=True, backend="reference", **params)
    torch.testing.assert_close(az.attention(q, k, v, method=name, causal=True, **params), ref)
    out, state = module.prefill(q[:, :, :13], k[:, :, :13], v[:, :, :13], **params)
    outs = [out]
    for t in range(13, 23):
        o_t, state = module.step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], **params)
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref)
    # the state after a prefill of everything equals the state reached by steps
    _, full_state = module.prefill(q, k, v, **params)
    torch.testing.assert_close(full_state, state)
    # noncausal cross lengths
    kc, vc = k[:, :, :17], v[:, :, :17]
    torch.testing.assert_close(
        az.attention(q, kc, vc, method=name, **params),
        az.attention(q, kc, vc, method=name, backend="reference", **params),
    )


@pytest.mark.parametrize(("name", "module", "make"), HASHED_AND_NORMED)
def test_gradients_agree(name: str, module: Any, make: Any) -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = qkv(2, 4, 2, 19, 6, 3, seed=gen, requires_grad=True)
    params = {name_: t.requires_grad_() if isinstance(t, torch.Tensor) else t for name_, t in make(gen).items()}
    params["chunk_size"] = 8
    leaves = [q, k, v, *(t for t in params.values() if isinstance(t, torch.Tensor))]
    grads = []
    for backend in ("reference", "torch"):
        out = az.attention(q, k, v, method=name, causal=True, backend=backend, **params)
        grads.append(torch.autograd.grad((out * out.detach().cos()).sum(), leaves))
    for ref_g, fast_g in zip(*grads, strict=True):
        assert bool(torch.isfinite(fast_g).all())
        torch.testing.assert_close(fast_g, ref_g)
    # the straight-through estimator lets the hash parameters and the queries learn
    assert all(float(g.abs().sum()) > 0 for g in grads[1][:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["nala", "ecoformer"])
def test_long_sequences_of_large_inputs_stay_finite(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = ((3 * torch.randn(1, 1, 65536, 8, generator=gen)).to(dtype) for _ in range(3))
    out = az.attention(q, k, v, method=name, causal=True)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
