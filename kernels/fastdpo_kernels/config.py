"""Block sizes, warps and chunking of every fastdpo kernel: the one place they are chosen.

``default_config()`` is the GPU default; under the Triton interpreter it returns small blocks so
that tiny test shapes still cross several tiles. ``use_config`` overrides it for a block of code, in the
current thread (or asyncio task) only. ``tuning_space()`` lists the candidates the autotuner
(:mod:`.autotune`) times on the user's GPU, starting from the default.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes (BLOCK_*), ``num_warps``/``num_stages`` per kernel, and the work split.

    Attributes:
        fwd_*: forward kernel (tokens × vocab tile, K-step over H).
        dlogits_*: backward kernel that recomputes a logit tile and writes its gradient.
        gw_*: grad-weight GEMM (vocab × hidden tile, K-step over tokens).
        gh_*: grad-hidden GEMM (tokens × hidden tile, K-step over the vocabulary chunk).
        kept_*: fast mode's elementwise kernel that turns kept ``exp(z − tile max)`` into the logit gradient
            (memory-bound: 4 elements a thread keep it under 64 registers, 8 CTAs an SM; 8 take 78-95 with
            triton 3.6).
        vocab_chunk: vocabulary columns per backward step; the logit-gradient workspace is
            ``tokens × vocab_chunk`` in the compute dtype.
        min_programs: the forward splits the vocabulary until it launches at least this many programs.
    """

    fwd_block_m: int = 128
    fwd_block_v: int = 128
    fwd_block_k: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dlogits_block_m: int = 128
    dlogits_block_v: int = 128
    dlogits_block_k: int = 64
    dlogits_warps: int = 8
    dlogits_stages: int = 3
    gw_block_v: int = 128
    gw_block_h: int = 128
    gw_block_k: int = 64
    gw_warps: int = 8
    gw_stages: int = 3
    gh_block_m: int = 128
    gh_block_h: int = 128
    gh_block_k: int = 64
    gh_warps: int = 8
    gh_stages: int = 3
    kept_block_m: int = 4
    kept_block_v: int = 128
    kept_warps: int = 4
    # 4096: at 8192 tokens × H=4096 the workspace (bf16 dZ + fp32 hidden-gradient sum) stays under 0.2 GiB.
    vocab_chunk: int = 4096
    # 4 x 132 SMs (H100 SXM): 4 waves of forward programs. On a GPU the default is MIN_PROGRAMS_PER_SM x its SMs.
    min_programs: int = 528

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if name.endswith(("block_m", "block_v", "block_k", "block_h")):
                # The elementwise kernel's rows need no tensor-core shape.
                low = 1 if name.startswith("kept_") else 16
                if value < low or value & (value - 1):
                    raise ValueError(f"{name} must be a power of two >= {low}, got {value}")
        if self.vocab_chunk < 1 or self.min_programs < 1:
            raise ValueError("vocab_chunk and min_programs must be >= 1")


# Hopper (sm_90), 16-bit inputs. Tiles of 128x128 keep the forward at 255 registers a thread with no
# spill (a few bytes with the extras); 128x256 spills hundreds of bytes (ptxas -v, sm_90a).
GPU_DEFAULT = KernelConfig()
# Datacenter Blackwell (sm_100, tcgen05): the forward and logit-gradient epilogues read the accumulator out of
# tensor memory into registers; half-width vocabulary tiles keep them from spilling (164 and 8 B at 128 wide).
BLACKWELL_DEFAULT = replace(GPU_DEFAULT, fwd_block_v=64, dlogits_block_v=64)
# fp32 operands take FMA-based products with more live registers: smaller forward tiles and K steps (a K step
# of 64 spills the logit-gradient kernel with triton 3.6, and so does a 128-row one with the accurate softcap tanh;
# a 128-wide grad-weight tile spills 12 B with 3.9, where
# ptxas caps it at 128 registers).
FP32_DEFAULT = replace(GPU_DEFAULT, fwd_block_m=64, fwd_block_k=32, dlogits_block_m=64, dlogits_block_k=32,
                       gw_block_h=64, gw_block_k=32, gh_block_k=32)
# Without Hopper's wgmma or datacenter Blackwell's tcgen05 (Ampere, Ada, consumer Blackwell sm_120: mma.sync, at
# most 99 KiB of shared memory a block but on sm_80/87) the forward's epilogue fits the registers with half-width
# vocabulary tiles, and grad-weight with a 32-wide K step (64 spills 140 B on sm_80 with triton 3.6).
AMPERE_DEFAULT = replace(GPU_DEFAULT, fwd_block_v=64, gw_block_k=32)
# The interpreter runs each program in numpy: small tiles keep the tests' odd shapes crossing
# tile, split and chunk boundaries.
INTERPRETER_DEFAULT = replace(
    GPU_DEFAULT,
    fwd_block_m=16, fwd_block_v=16, fwd_block_k=16,
    dlogits_block_m=16, dlogits_block_v=16, dlogits_block_k=16,
    gw_block_v=16, gw_block_h=16, gw_block_k=16,
    gh_block_m=16, gh_block_h=16, gh_block_k=16,
    kept_block_m=4, kept_block_v=16,
    vocab_chunk=24, min_programs=4,
)

MIN_PROGRAMS_PER_SM = 4
# Context-local (per thread and per asyncio task), so one thread's override never reaches another's kernels.
_override: contextvars.ContextVar[KernelConfig | None] = contextvars.ContextVar("fastdpo_kernel_config",
                                                                                 default=None)


def default_config(dtype=None, capability=None, sm_count=None) -> KernelConfig:
    """The config for inputs of ``dtype`` on a GPU of compute ``capability`` (major, minor) with ``sm_count`` SMs
    (``min_programs`` becomes ``MIN_PROGRAMS_PER_SM × sm_count``; None keeps 528).

    ``use_config`` overrides it; under the interpreter it is ``INTERPRETER_DEFAULT``.
    """
    override = _override.get()
    if override is not None:
        return override
    from triton import knobs

    if knobs.runtime.interpret:
        return INTERPRETER_DEFAULT
    import torch

    if dtype == torch.float32:
        config = FP32_DEFAULT
    elif capability is not None and not 9 <= capability[0] < 12:
        config = AMPERE_DEFAULT
    elif capability is not None and capability[0] >= 10:
        config = BLACKWELL_DEFAULT
    else:
        config = GPU_DEFAULT
    if sm_count:
        config = replace(config, min_programs=MIN_PROGRAMS_PER_SM * int(sm_count))
    return config


def overridden() -> bool:
    """Whether ``use_config`` set the config here (then nothing is tuned)."""
    return _override.get() is not None


# What the autotuner may change, per kernel family, in the order it tunes them (coordinate descent: each family
# with the best of the previous ones). Never fwd_block_v: fast mode's kept tiles are laid out by it.
# - forward and logit gradient: pipeline depth 3-5 and the K step (the default's and twice it). At 1 CTA/SM they
#   use 96 of 227 KiB of shared memory, so deeper pipelines cost nothing where they fit (shared_bytes()).
# - grad-hidden: the default (1 CTA/SM) and GH_TWO_CTAS, at <= 128 registers a thread (2 CTAs/SM).
# - forward split: min_programs as 2, 4 or 8 times the SM count.
# - backward chunk: vocab_chunk and twice it (8192 halves the fp32 hidden-gradient accumulator's traffic and the
#   launches); not when a memory budget keeps part of the vocabulary, whose kept columns are whole chunks.
GH_TWO_CTAS = dict(gh_block_m=64, gh_block_h=128, gh_block_k=64, gh_warps=8, gh_stages=3)
TUNE_STAGES = (3, 4, 5)
TUNE_PROGRAMS_PER_SM = (2, 4, 8)


def shared_bytes(config: KernelConfig, family: str, itemsize: int) -> int:
    """Shared memory the pipelined K loop of ``family`` ("fwd", "dlogits", "gw", "gh") stages: one operand tile
    pair per stage (what Triton allocates for the loop, give or take its layout padding)."""
    f = {"fwd": ("fwd_block_m", "fwd_block_v", "fwd_block_k", "fwd_stages"),
         "dlogits": ("dlogits_block_m", "dlogits_block_v", "dlogits_block_k", "dlogits_stages"),
         "gw": ("gw_block_v", "gw_block_h", "gw_block_k", "gw_stages"),
         "gh": ("gh_block_m", "gh_block_h", "gh_block_k", "gh_stages")}[family]
    a, b, k, stages = (getattr(config, name) for name in f)
    return stages * (a + b) * k * itemsize


def tuning_space(base: KernelConfig, sm_count=None, tune_chunk=True, shared_limit=None, itemsize=2):
    """``[(family, [overrides, ...]), ...]``: the candidates of each family, the base's own values first.

    With ``shared_limit`` (bytes a block may use) the tile candidates whose pipelined loop needs more
    (:func:`shared_bytes`, for ``itemsize``-byte inputs) are left out: they would not launch."""
    def tiles(prefix):
        k = getattr(base, f"{prefix}_block_k")
        return [{f"{prefix}_block_k": bk, f"{prefix}_stages": st} for bk in (k, 2 * k) for st in TUNE_STAGES]

    programs = ([n * int(sm_count) for n in TUNE_PROGRAMS_PER_SM] if sm_count
                else [max(1, base.min_programs // 2), base.min_programs, 2 * base.min_programs])
    space = [("fwd", tiles("fwd")),
             ("min_programs", [{"min_programs": p} for p in programs]),
             ("dlogits", tiles("dlogits")),
             ("gh", [{}, dict(GH_TWO_CTAS)])]
    if tune_chunk:
        space.append(("vocab_chunk", [{"vocab_chunk": base.vocab_chunk}, {"vocab_chunk": 2 * base.vocab_chunk}]))
    if shared_limit:
        space = [(family, [c for c in cands if family not in ("fwd", "dlogits", "gh")
                           or shared_bytes(replace(base, **c), family, itemsize) <= shared_limit])
                 for family, cands in space]
    return [(family, _first_is_base(base, cands)) for family, cands in space]


def _first_is_base(base, candidates):
    """The base's own values first (ties keep the default), each distinct candidate once."""
    own = {k: getattr(base, k) for k in candidates[0]} if candidates else {}
    out = [own]
    for c in candidates:
        if replace(base, **c) not in [replace(base, **o) for o in out]:
            out.append(c)
    return out


@contextlib.contextmanager
def use_config(config: KernelConfig):
    """Run the kernels with ``config`` inside the ``with`` block, in this thread (or asyncio task) only."""
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig, got {type(config).__name__}")
    token = _override.set(config)
    try:
        yield config
    finally:
        _override.reset(token)

