"""Suite ``structured`` (P family): structured-sparsity fast paths against SDPA at N=16384 (B=1 H=8 D=64), their
training step, peak memory at N=65536, GNA and long/short attention, and P11–P14 against SDPA and their dense
references."""

from __future__ import annotations

import torch

from attnzoo.bench.suites import Case, Target, at_least, below
from attnzoo.masks import dense
from attnzoo.masks.positional import concentric_position_ids, position_causal

GRID = (128, 128)


def documents_of_1024(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Document ids of ``n // 1024`` packed documents of 1024 tokens."""
    return {"group_ids": torch.arange(n) // 1024}


def window_regression(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Varied-window attention's learnable window regression, ``0.3 · randn(heads, 64, 4)``."""
    return {"window_regression": 0.3 * torch.randn(heads, 64, 4, generator=g)}


def concentric_mask(n: int, heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The dense concentric-causal mask of a 64×64 image after 64 text tokens, prebuilt for SDPA."""
    pos = concentric_position_ids(n, (64, 64), 64)
    return {"attn_mask": dense(position_causal(pos, pos), 1, 1, n, n, "cpu").contiguous()}


def _na(name: str, what: str, backend: str, floor: float | None = None, **params: object) -> Case:
    """A forward case against SDPA; ``params`` hold ``method`` and ``causal`` besides the method's parameters."""
    method = str(params.pop("method"))
    causal = bool(params.pop("causal", False))
    target = Target(f"{method} ({backend})", method, backend, params)
    return Case(name, what + f" ({backend}) vs SDPA", "compare", target, causal=causal,
                floors={"speedup": at_least(floor)} if floor else {})


CCA = {"layout": (64, 64), "image_start": 64}
VARIED = {"layout": (64, 64), "window_size": 8}

CASES = (
    _na("na1d", "1-D neighborhood N=16384 k=1023", "torch", 6, method="neighborhood", kernel_size=1023),
    _na("na1d_flex", "1-D neighborhood N=16384 k=1023", "flex", method="neighborhood", kernel_size=1023),
    _na("swa_causal", "causal sliding window N=16384 w=1024", "torch", 3, method="sliding_window", window=1024,
        causal=True),
    _na("na2d", "2-D neighborhood 128×128 k=13×13", "torch", 8, method="neighborhood", kernel_size=13, layout=GRID),
    _na("na2d_flex", "2-D neighborhood 128×128 k=13×13", "flex", method="neighborhood", kernel_size=13, layout=GRID),
    _na("axial_rows", "axial 128×128, rows", "sdpa", 12, method="axial", layout=GRID, axis=1),
    _na("axial_cols", "axial 128×128, columns", "sdpa", 12, method="axial", layout=GRID, axis=0),
    _na("axial_both", "axial 128×128, both axes in sequence", "sdpa", 6, method="axial", layout=GRID),
    Case("na1d_grad", "1-D neighborhood N=16384 k=1023, forward+backward (torch) vs SDPA", "compare",
         Target("neighborhood (torch)", "neighborhood", "torch", {"kernel_size": 1023}), backward=True,
         floors={"speedup": at_least(4)}),
    _na("halo2d", "halo 128×128, block 8, halo 3", "torch", method="halo", block_size=8, halo_size=3, layout=GRID),
    _na("dilated", "dilated N=16384, dilation 4, window 256", "torch", method="dilated", dilation=4, window=256),
    _na("maxvit_block", "maxvit_block 128×128, window 8", "sdpa", method="maxvit_block", window_size=8, layout=GRID),
    _na("maxvit_grid", "maxvit_grid 128×128, grid 8", "sdpa", method="maxvit_grid", grid_size=8, layout=GRID),
    Case("grouped_docs", "grouped, 16 packed documents of 1024, N=16384 (torch) vs SDPA", "compare",
         Target("grouped (torch)", "grouped", "torch", tensors=documents_of_1024)),
    Case("na1d_mem", "peak memory above the inputs, 1-D neighborhood N=65536 k=1023 (torch, fresh process)", "memory",
         Target("neighborhood (torch)", "neighborhood", "torch", {"kernel_size": 1023}), against=None, n=65536,
         metric="peak_gib", floors={"peak_gib": below(2.0)}),
    _na("gna1d", "GNA 1-D N=16384 k=1023 stride 1", "torch", method="generalized_neighborhood", kernel_size=1023),
    _na("gna1d_s64", "GNA 1-D N=16384 k=1023 stride 64", "torch", method="generalized_neighborhood",
        kernel_size=1023, stride=64),
    _na("gna2d", "GNA 2-D 128×128 k=13 stride 1", "torch", method="generalized_neighborhood", kernel_size=13,
        layout=GRID),
    _na("gna2d_s13", "GNA 2-D 128×128 k=13 stride 13", "torch", method="generalized_neighborhood", kernel_size=13,
        stride=13, layout=GRID),
    _na("long_short_short", "long_short short, G=8, 128×128", "sdpa", method="long_short", distance="short",
        group_size=8, layout=GRID),
    _na("long_short_long", "long_short long, I=16, 128×128", "sdpa", method="long_short", distance="long",
        interval=16, layout=GRID),
    # P11–P14: the torch path against SDPA and against the dense reference (2 threads, as measured)
    Case("p11_channel_group", "P11 channel_group S=16384 (torch) vs SDPA (softmax over positions)", "compare",
         Target("channel_group (torch)", "channel_group", "torch"), threads=2, rounds=5),
    Case("p11_channel_group_ref", "P11 channel_group S=16384 (torch) vs its dense reference", "compare",
         Target("channel_group (torch)", "channel_group", "torch"),
         against=Target("reference", "channel_group", "reference"), threads=2),
    Case("p12_latent", "P12 local_global_latent, 4096 data + 16×8 latents (torch) vs SDPA (full)", "compare",
         Target("local_global_latent (torch)", "local_global_latent", "torch",
                {"num_groups": 16, "latents_per_group": 8}), n=4096 + 128, threads=2, rounds=5),
    Case("p12_latent_ref", "P12 local_global_latent (torch) vs its dense reference", "compare",
         Target("local_global_latent (torch)", "local_global_latent", "torch",
                {"num_groups": 16, "latents_per_group": 8}),
         against=Target("reference", "local_global_latent", "reference", {"num_groups": 16, "latents_per_group": 8}),
         n=4096 + 128, threads=2),
    Case("p13_concentric", "P13 concentric_causal, 64×64 image + 320 text (torch) vs SDPA with the prebuilt CCA mask",
         "compare", Target("concentric_causal (torch)", "concentric_causal", "torch", CCA),
         against=Target("SDPA (dense CCA mask)", tensors=concentric_mask, causal=False), n=4096 + 320, causal=True,
         threads=2, rounds=5),
    Case("p13_concentric_causal", "P13 concentric_causal (torch) vs plain causal SDPA", "compare",
         Target("concentric_causal (torch)", "concentric_causal", "torch", CCA), n=4096 + 320, causal=True,
         threads=2, rounds=5),
    Case("p13_concentric_ref", "P13 concentric_causal (torch) vs its dense reference", "compare",
         Target("concentric_causal (torch)", "concentric_causal", "torch", CCA),
         against=Target("reference", "concentric_causal", "reference", CCA), n=4096 + 320, causal=True, threads=2),
    Case("p14_varied", "P14 varied_window 64×64, window 8 (torch) vs SDPA (full)", "compare",
         Target("varied_window (torch)", "varied_window", "torch", VARIED, window_regression), n=4096, threads=2,
         rounds=5),
    Case("p14_varied_zero", "P14 varied_window, zero regression (torch) vs SDPA (full)", "compare",
         Target("varied_window (torch)", "varied_window", "torch", VARIED), n=4096, threads=2, rounds=5),
    Case("p14_varied_ref", "P14 varied_window (torch) vs its dense reference", "compare",
         Target("varied_window (torch)", "varied_window", "torch", VARIED, window_regression),
         against=Target("reference", "varied_window", "reference", VARIED, window_regression), n=4096, threads=2),
    # peers (optional packages): NATTEN on the same CPU
    Case("natten_na1d", "1-D neighborhood N=8192 k=511 (torch) vs NATTEN's na1d", "compare",
         Target("neighborhood (torch)", "neighborhood", "torch", {"kernel_size": 511}),
         against=Target("NATTEN na1d", params={"kernel_size": 511}, peer="natten_neighborhood"), n=8192,
         floors={"speedup": at_least(1)}, requires="natten"),
    Case("natten_na2d", "2-D neighborhood 96×96 k=13 (torch) vs NATTEN's na2d", "compare",
         Target("neighborhood (torch)", "neighborhood", "torch", {"kernel_size": 13, "layout": (96, 96)}),
         against=Target("NATTEN na2d", params={"kernel_size": 13, "layout": (96, 96)}, peer="natten_neighborhood"),
         n=96 * 96, floors={"speedup": at_least(1)}, requires="natten"),
)
