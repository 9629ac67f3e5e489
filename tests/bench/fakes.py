"""Methods that exist only for the benchmark's own tests, registered and removed around each test."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax, visible
from attnzoo.registry import _REGISTRY, ALL_PATTERNS, Backend, MethodSpec, Param, register


def local_reference(q, k, v, *, causal, scale, mask, bias, window):
    """Softmax restricted to keys within ``window`` positions of the query: an 'approximation' of softmax."""
    s = dense_scores(q, k, scale)
    i = torch.arange(q.shape[2]).unsqueeze(-1) + (k.shape[2] - q.shape[2])
    j = torch.arange(k.shape[2])
    near = (i - j).abs() <= window
    return safe_softmax(s, visible(causal, mask, q, k) & near) @ repeat_kv(v, q.shape[1])


def raising(q, k, v, *, causal, scale, mask, bias, **_):
    raise RuntimeError("kaboom from the fake method")


def interrupting(q, k, v, *, causal, scale, mask, bias, **_):
    raise KeyboardInterrupt


def crashing(q, k, v, *, causal, scale, mask, bias, **_):
    os.kill(os.getpid(), signal.SIGKILL)


def spec(name: str, exact: bool = True, params: tuple[Param, ...] = ()) -> MethodSpec:
    return MethodSpec(name=name, family="softmax", mechanism="S0", paper="none", arxiv=None, summary="test only",
                      exact=exact, patterns=ALL_PATTERNS, params=params, supports_mask=False, supports_bias=False)


@contextmanager
def registered(name: str, fn: Callable[..., torch.Tensor], exact: bool = True,
               params: tuple[Param, ...] = ()) -> Iterator[str]:
    register(spec(name, exact, params), local_reference if params else fn, [Backend("torch", fn)])
    try:
        yield name
    finally:
        _REGISTRY.pop(name, None)


def register_crashing() -> None:
    """Used as a plugin module by the worker (``--import tests.bench.fakes_plugin``)."""
    register(spec("test_crashing"), crashing, [Backend("torch", crashing)])
