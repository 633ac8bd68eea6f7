"""Block sizes, warps and chunking of every fastdpo kernel: the one place they are chosen.

``default_config()`` is the GPU default; under the Triton interpreter it returns small blocks so
that tiny test shapes still cross several tiles. ``use_config`` overrides it for a block of code, in the
current thread (or asyncio task) only.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace

import triton


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes (BLOCK_*), ``num_warps``/``num_stages`` per kernel, and the work split.

    Attributes:
        fwd_*: forward kernel (tokens × vocab tile, K-step over H).
        dlogits_*: backward kernel that recomputes a logit tile and writes its gradient.
        gw_*: grad-weight GEMM (vocab × hidden tile, K-step over tokens).
        gh_*: grad-hidden GEMM (tokens × hidden tile, K-step over the vocabulary chunk).
        kept_*: fast mode's elementwise kernel that turns kept ``exp(z − tile max)`` into the logit gradient
            (memory-bound: 8 elements a thread keep it near 60 registers, 8 CTAs an SM).
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
    kept_block_v: int = 256
    kept_warps: int = 4
    # 4096: at 8192 tokens × H=4096 the workspace (bf16 dZ + fp32 hidden-gradient sum) stays under 0.2 GiB.
    vocab_chunk: int = 4096
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
# fp32 operands take FMA-based products with more live registers: smaller forward tiles and K steps.
FP32_DEFAULT = replace(GPU_DEFAULT, fwd_block_m=64, fwd_block_k=32, gw_block_k=32, gh_block_k=32)
# Ampere (sm_80) has no wgmma: the forward's epilogue fits its registers with half-width vocabulary tiles.
AMPERE_DEFAULT = replace(GPU_DEFAULT, fwd_block_v=64)
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

# Context-local (per thread and per asyncio task), so one thread's override never reaches another's kernels.
_override: contextvars.ContextVar[KernelConfig | None] = contextvars.ContextVar("fastdpo_kernel_config",
                                                                                 default=None)


def default_config(dtype=None, capability=None) -> KernelConfig:
    """The config for inputs of ``dtype`` on a GPU of compute ``capability`` (major, minor).

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
        return FP32_DEFAULT
    if capability is not None and capability[0] < 9:
        return AMPERE_DEFAULT
    return GPU_DEFAULT


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


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
