"""Group masks against explicit loops: per-batch group ids (P10), and FIT's latent groups (P12)."""

from __future__ import annotations

import pytest
import torch

from attnzoo import masks
from attnzoo.masks.groups import grouped, latent_groups


def test_grouped_predicate_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    qids, kids = torch.randint(0, 3, (2, 9), generator=g), torch.randint(0, 3, (2, 6), generator=g)
    got = masks.dense(grouped(qids, kids), 2, 1, 9, 6, "cpu")[:, 0]
    want = torch.tensor([[[int(qids[b, i]) == int(kids[b, j]) for j in range(6)] for i in range(9)] for b in range(2)])
    assert torch.equal(got, want)


@pytest.mark.parametrize(("data", "groups", "latents"), [(12, 3, 2), (10, 5, 0), (6, 1, 3), (9, 3, 1)])
def test_latent_groups_predicate_matches_loops(data, groups, latents):
    n = data + groups * latents
    size = data // groups

    def group(t: int) -> tuple[bool, int]:
        return (False, t // size) if t < data else (True, (t - data) // latents)

    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            (li, gi), (lj, gj) = group(i), group(j)
            want[i, j] = gi == gj or (li and lj)
    assert torch.equal(masks.dense(latent_groups(data, groups, latents), 1, 1, n, n, "cpu")[0, 0], want)
