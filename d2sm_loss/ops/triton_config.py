"""Launch configurations of the Triton kernels (:mod:`.triton_kernels`): block sizes from
a heuristic on the feature size (no autotuning), the tile products' precision and dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .._compat import tf32_allowed, triton_interpreted

__all__ = ["BackwardConfig", "BlockConfig", "ForwardConfig", "choose_block_config"]


@dataclass(frozen=True)
class ForwardConfig:
    """Launch configuration of the forward kernel (every ``tl.dot`` operand dimension >= 16)."""

    block_m: int  # rows owned by a program
    block_n: int  # columns per streamed tile
    block_k: int  # D chunk of the similarity products
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class BackwardConfig:
    """Launch configuration of the backward kernel (every ``tl.dot`` operand dimension >= 16)."""

    block_m: int  # rows owned by a program
    block_n: int  # columns per streamed tile
    block_k: int  # D chunk of the similarity products
    block_dout: int  # D columns of the gradient owned by a program
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class BlockConfig:
    """The forward and the backward kernel's launch configurations for one problem."""

    forward: ForwardConfig
    backward: BackwardConfig


def choose_block_config(d: int, dtype: torch.dtype, interpreted: bool | None = None) -> BlockConfig:
    """Block sizes from a simple heuristic on the feature size ``d`` (no autotuning).

    Under the interpreter (``interpreted=None``: whether ``TRITON_INTERPRET`` is set) small
    tiles keep the numpy work cheap (and still leave several tiles per dimension in the
    tests). On a GPU, 8 warps, D chunks of 16 for the similarity products, and:

    - forward: 64 x 64 row/column tiles;
    - backward: one program owns all gradient columns of its rows up to D = 512, so the
      similarity tiles are computed once (``6 N^2 D`` FLOPs): 64 x 64 tiles and
      ``next_pow2(D)`` columns for D <= 128, 32 x 64 tiles and 256 columns for D <= 256,
      32 x 32 tiles and 512 columns for D <= 512. Wider rows use 64 x 64 tiles and chunks of
      128 columns, each recomputing the tiles.

    Chosen from ptxas's register report on ahead-of-time compiles for sm_90 (``ptxas -v``;
    ``tests/test_triton_compile.py``). With Triton 3.9.0: no spills in the forward; in the
    backward at most 8 bytes per thread for float32 and bfloat16 up to D = 512, 24 bytes
    for float16 at D = 512 and 96 bytes with 128-column chunks (float32, D = 1000), where
    64 x 64 tiles holding 256 gradient columns would spill 23 KB (float32) and 64 x 64
    tiles with two 128-column chunks at D = 256 200 bytes. Not yet timed on hardware.
    float64 uses 32 x 32 tiles and 4 warps.
    """
    if interpreted is None:
        interpreted = triton_interpreted()
    d_pow2 = max(16, triton.next_power_of_2(d))
    if interpreted:
        block_k = min(d_pow2, 32)
        return BlockConfig(
            ForwardConfig(block_m=16, block_n=16, block_k=block_k),
            BackwardConfig(block_m=16, block_n=16, block_k=block_k, block_dout=min(d_pow2, 32)),
        )
    if dtype == torch.float64:
        block_k = min(d_pow2, 32)
        return BlockConfig(
            ForwardConfig(block_m=32, block_n=32, block_k=block_k),
            BackwardConfig(block_m=32, block_n=32, block_k=block_k, block_dout=min(d_pow2, 64)),
        )
    if d_pow2 <= 128:
        bwd_m, bwd_n, dout = 64, 64, d_pow2
    elif d_pow2 <= 256:
        bwd_m, bwd_n, dout = 32, 64, 256
    elif d_pow2 <= 512:
        bwd_m, bwd_n, dout = 32, 32, 512
    else:
        bwd_m, bwd_n, dout = 64, 64, 128
    return BlockConfig(
        ForwardConfig(block_m=64, block_n=64, block_k=16, num_warps=8),
        BackwardConfig(block_m=bwd_m, block_n=bwd_n, block_k=16, block_dout=dout, num_warps=8),
    )


def _dot_precision(dtype: torch.dtype, allow_tf32: bool | None = None) -> str:
    """``tl.dot``'s ``input_precision`` for the tile products.

    ``"ieee"`` (exact float32 products) unless the inputs are float32 and TF32 is allowed:
    ``allow_tf32=None`` follows PyTorch's own switch for float32 CUDA matrix products
    (``d2sm_loss._compat.tf32_allowed()``, e.g. after
    ``torch.backends.cuda.matmul.allow_tf32 = True``), the same trade the plain PyTorch path
    makes under that setting. The interpreter always computes in IEEE.
    """
    if allow_tf32 is None:
        allow_tf32 = tf32_allowed()
    if dtype == torch.float32 and allow_tf32 and not triton_interpreted():
        return "tf32"
    return "ieee"


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_native(dtype: torch.dtype) -> bool:
    """Whether similarity tiles are multiplied in the input dtype (exact products, float32
    accumulation) rather than after an upcast."""
    if dtype == torch.float16:
        return True
    if dtype == torch.bfloat16:
        return not triton_interpreted()  # the interpreter's bfloat16 tl.dot is wrong
    return True  # float32 and float64 are their own accumulation dtype
