"""Group predicates: tokens attend within their group (documents, instances, regions, FIT's latent groups)."""

from __future__ import annotations

import torch

from attnzoo.masks.core import MaskMod

__all__ = ["grouped", "latent_groups"]


def grouped(q_ids: torch.Tensor, kv_ids: torch.Tensor) -> MaskMod:
    """Group (document / instance / region) predicate: key ``j`` visible to query ``i`` of batch ``b`` iff
    ``q_ids[b, i] == kv_ids[b, j]``. ``q_ids (B, Sq)``, ``kv_ids (B, Skv)``: integer tensors (or expanded views)."""

    def grouped_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return q_ids[b, q_idx] == kv_ids[b, kv_idx]

    return grouped_mod


def latent_groups(num_data: int, num_groups: int, latents_per_group: int) -> MaskMod:
    """FIT's local + global latent predicate on a sequence ``[data tokens; latent tokens]``, both group-major.

    Data token ``t < num_data`` is in group ``t // (num_data / G)``; latent ``num_data + l`` in group
    ``l // latents_per_group``. Key ``j`` is visible to query ``i`` iff they share a group (local attention among data,
    data ↔ its own latents) or both are latents (global attention among latents).
    """
    size = num_data // num_groups
    lat = max(latents_per_group, 1)

    def latent_groups_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_lat, k_lat = q_idx >= num_data, kv_idx >= num_data
        q_group = torch.where(q_lat, (q_idx - num_data) // lat, q_idx // size)
        k_group = torch.where(k_lat, (kv_idx - num_data) // lat, kv_idx // size)
        return (q_group == k_group) | (q_lat & k_lat)

    return latent_groups_mod
