"""Every kernel compiles for real NVIDIA targets, here without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects (non-constexpr globals,
mixed dtypes in a dot, unsupported control flow). This compiles them to cubin ahead of time for
Hopper (sm_90) and Ampere (sm_80) with Triton's bundled ptxas, specialized as a launch on contiguous,
16-byte-aligned tensors is (unit strides constant, pointers and other strides divisible by 16), and
checks that the K loops are software-pipelined there (asynchronous copies into shared memory). It
runs in a subprocess because the test session imports the kernels under the interpreter.
"""

import json
import os
import subprocess
import sys

import pytest

CASES = [(90, "bf16"), (90, "fp16"), (90, "fp32"), (80, "bf16")]
KERNEL_NAMES = ["forward", "dlogits", "grad_weight", "grad_hidden"]


def _spill_bytes(ptx, arch):
    """Register spill stores ptxas reports for this PTX (the same ptxas Triton uses for ``arch``)."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", f.name,
                              "-o", os.devnull], capture_output=True, text=True)
    found = re.findall(r"(\d+) bytes spill stores", out.stdout + out.stderr)
    return sum(map(int, found)) if out.returncode == 0 and found else f"ptxas failed: {out.stderr[-300:]}"


def _compile_all():
    """Compile every kernel for every case; returns {"name/arch/dtype": shared bytes or error text}."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdpo.kernels import logprob_bwd, logprob_fwd
    from fastdpo.kernels.config import default_config

    def kernels_for(C):
        return {
            "forward": (logprob_fwd._logprob_fwd_kernel, C.fwd_warps, C.fwd_stages,
                        dict(HAS_BIAS=True, HAS_SOFTCAP=True, EXTRAS=True, BLOCK_M=C.fwd_block_m,
                             BLOCK_V=C.fwd_block_v, BLOCK_K=C.fwd_block_k)),
            "dlogits": (logprob_bwd._dlogits_kernel, C.dlogits_warps, C.dlogits_stages,
                        dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_M=C.dlogits_block_m, BLOCK_V=C.dlogits_block_v,
                             BLOCK_K=C.dlogits_block_k)),
            "grad_weight": (logprob_bwd._grad_weight_kernel, C.gw_warps, C.gw_stages,
                            dict(HAS_BIAS=True, BLOCK_V=C.gw_block_v, BLOCK_H=C.gw_block_h, BLOCK_K=C.gw_block_k)),
            "grad_hidden": (logprob_bwd._grad_hidden_kernel, C.gh_warps, C.gh_stages,
                            dict(FIRST=False, LAST=True, BLOCK_M=C.gh_block_m, BLOCK_H=C.gh_block_h,
                                 BLOCK_K=C.gh_block_k)),
        }
    # Pointer arguments whose dtype does not follow the inputs'.
    fixed = {"rows_ptr": "*i64", "tgt_ptr": "*i64", "nv_ptr": "*i32", "stats_ptr": "*fp32", "lse_ptr": "*fp32",
             "g_ptr": "*fp32", "acc_ptr": "*fp32", "gscale_ptr": "*fp32"}
    # Strides that are 1 on contiguous inputs; Triton's launcher turns those into constants.
    unit = {"forward": ("stride_xh", "stride_wh"), "dlogits": ("stride_xh", "stride_wh"),
            "grad_weight": ("stride_xh", "stride_gwh"), "grad_hidden": ("stride_wh",)}
    results = {}
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for name in KERNEL_NAMES:
        for arch, dtype in CASES:
            # The config the launcher picks for this dtype and GPU generation.
            config = default_config(torch_dtype[dtype], (arch // 10, 0))
            kernel, warps, stages, constexprs = kernels_for(config)[name]
            const = dict(constexprs, DOT_F32=False, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
            const.update({arg: 1 for arg in unit[name]})
            if name in ("grad_weight", "grad_hidden"):
                const["RESCALE"] = dtype == "fp16"
            sig, attrs = {}, {}
            for i, arg in enumerate(kernel.arg_names):
                if arg in const:
                    sig[arg] = "constexpr"
                    continue
                if arg.endswith("_ptr"):
                    sig[arg] = fixed.get(arg, f"*{dtype}")
                else:
                    sig[arg] = "fp32" if arg in ("softcap", "scale") else "i32"
                if arg.endswith("_ptr") or arg.startswith("stride") or arg == "H":
                    attrs[(i,)] = [["tt.divisibility", 16]]
            key = f"{name}/{arch}/{dtype}"
            try:
                compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                          options=dict(num_warps=warps, num_stages=stages))
                ttgir = compiled.asm["ttgir"]
                results[key] = {"shared": compiled.metadata.shared, "cubin": bool(compiled.asm.get("cubin")),
                                "async_copies": ttgir.count("async_copy_global_to_local"),
                                "spill_bytes": _spill_bytes(compiled.asm["ptx"], arch)}
            except Exception as err:  # noqa: BLE001 - reported per kernel by the test
                results[key] = f"{type(err).__name__}: {err}"
    return results


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch, dtype", CASES)
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_compiles_for_gpu(compiled, name, arch, dtype):
    result = compiled[f"{name}/{arch}/{dtype}"]
    assert isinstance(result, dict), result
    assert result["cubin"]
    # The tiles must fit one SM's shared memory (227 KiB usable on sm_90, 163 KiB on sm_80).
    assert result["shared"] <= (232448 if arch == 90 else 166912)
    assert result["async_copies"] > 0, "the K loop is not pipelined"
    # A tile that spills registers to local memory slows every iteration; the forward with its extras
    # (entropy, Σp², argmax) spills a few bytes at the default tiles, nothing else may.
    assert isinstance(result["spill_bytes"], int), result["spill_bytes"]
    assert result["spill_bytes"] <= 64, f"{result['spill_bytes']} bytes of register spills"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
