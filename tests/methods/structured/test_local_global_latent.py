"""P12 local + global latent attention (FIT): the fast path against the dense reference, and parameter errors."""

from __future__ import annotations

import pytest

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_matches_reference, qkv


@pytest.mark.parametrize(("groups", "latents"), [(4, 3), (5, 0), (1, 6)])
@pytest.mark.parametrize(("dv", "return_lse"), [(6, False), (6, True), (8, True)])
def test_local_global_latent_torch_matches_reference(groups, latents, dv, return_lse):
    q, k, v = qkv(2, 4, 2, 200 + groups * latents, dv=dv, requires_grad=True)
    assert_matches_reference("local_global_latent", q, k, v, num_groups=groups, latents_per_group=latents,
                             return_lse=return_lse)


@pytest.mark.parametrize(("params", "name"), [(dict(num_groups=7), "num_groups"),
                                              (dict(num_groups=3, latents_per_group=2), "latents_per_group"),
                                              (dict(num_groups=2, latents_per_group=20), "latents_per_group"),
                                              (dict(num_groups=0), "num_groups")])
def test_local_global_latent_errors(params, name):
    q, k, v = qkv(1, 2, 2, 40, requires_grad=True)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="local_global_latent", **params)
