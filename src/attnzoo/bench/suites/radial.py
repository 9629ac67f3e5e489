"""Suite ``radial`` (P7): radial attention against SDPA at video shapes (B=1 H=4 D=64, one torch thread), the token
rule, training steps, and peak memory of the block and token paths.

The paper's regime is many latent frames with its deployed mask on 128×128 blocks (``decay_factor`` 1 for
HunyuanVideo, 0.2 for Wan, whose mask also keeps frame 0 dense): the cases grow the frame count at 256 tokens per frame
and hold N = 16384 while trading tokens per frame for frames. One thread: on a machine shared with other jobs, each
small multi-threaded op of the sparse path can wait a scheduler slice for its second thread.
"""

from __future__ import annotations

from attnzoo.bench.suites import Case, Target

HEADS = 4


def _radial(frames: int, spatial: int, block: int | None = 128, decay: float = 1.0, text: int = 0,
            first: bool = False) -> Target:
    params = {"layout": (frames, spatial), "text_tokens": text, "dense_first_frame": first, "block_size": block,
              "decay_factor": decay}
    mask = "token rule" if block is None else f"block {block}, decay {decay:g}"
    return Target(f"radial ({mask})", "radial", "torch", params)


def _case(name: str, frames: int, spatial: int, *, backward: bool = False, rounds: int = 3, text: int = 0,
          **mask: object) -> Case:
    what = f"radial F={frames} × {spatial} tokens/frame" + (f" + {text} text" if text else "")
    what += (", forward+backward" if backward else "") + " vs SDPA"
    return Case(name, what, "compare", _radial(frames, spatial, text=text, **mask),  # type: ignore[arg-type]
                n=frames * spatial + text, heads=HEADS, backward=backward, rounds=rounds, threads=1)


def _memory(name: str, block: int | None, backward: bool) -> Case:
    what = (f"peak memory above the inputs, radial {'token rule' if block is None else 'block mask'} 64×256, "
            f"{'forward+backward' if backward else 'forward'} (fresh process, plan built first); SDPA beside")
    return Case(name, what, "memory", _radial(64, 256, block=block), n=64 * 256, heads=HEADS, backward=backward,
                metric="peak_gib", prime=True, threads=1)


CASES = (
    _case("radial_f32", 32, 256),
    _case("radial_f64", 64, 256),
    _case("radial_f128", 128, 256, rounds=2),
    _case("radial_s512", 32, 512),
    _case("radial_s128", 128, 128),
    _case("radial_wan", 64, 256, decay=0.2, text=256, first=True),
    _case("radial_s384", 64, 384, rounds=2),
    _case("radial_token_f64", 64, 256, block=None),
    _case("radial_token_f128", 128, 128, block=None),
    _case("radial_grad_f64", 64, 256, backward=True, rounds=2),
    _case("radial_grad_s128", 128, 128, backward=True, rounds=2),
    _case("radial_grad_token_f64", 64, 256, block=None, backward=True, rounds=2),
    _memory("radial_memory_block", 128, False),
    _memory("radial_memory_block_grad", 128, True),
    _memory("radial_memory_token", None, False),
    _memory("radial_memory_token_grad", None, True),
)
