"""Every kernel compiles for real NVIDIA targets, here without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects (non-constexpr globals,
mixed dtypes in a dot, unsupported control flow). This compiles them to cubin ahead of time for
Hopper (sm_90) and Ampere (sm_80) with Triton's bundled ptxas, specialized as a launch on contiguous,
16-byte-aligned tensors at a real head is (unit strides constant; pointers, other strides and the sizes divisible
by 16, DIVISIBLE_INTS), and
also for sm_86, sm_89, sm_100a and sm_120a (where the installed Triton targets them) within each one's shared memory,
and checks, per kernel and target, what a GPU run relies on: the K loops are software-pipelined (asynchronous copies
into shared memory); the products run on tensor cores (``wgmma`` on Hopper, ``mma.sync`` on Ampere, for 16-bit
inputs); no register spills; and each kernel within its register budget (``REGISTER_BUDGET``). It runs in a
subprocess because the test process imports the kernels under the interpreter; ``python
tests/test_kernels_compile.py --table`` prints the figures.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

CASES = [(90, "bf16"), (90, "fp16"), (90, "fp32"), (80, "bf16")]
# The other generations a user may train on (Ampere consumer, Ada, datacenter and consumer Blackwell), bf16, where
# the installed Triton targets them (Blackwell from triton 3.3).
OTHER_ARCHS = [(86, "bf16"), (89, "bf16"), (100, "bf16"), (120, "bf16")]
KERNEL_NAMES = ["forward", "forward+extras", "dlogits", "grad_weight", "grad_hidden", "grad_hidden_2cta",
                "forward_keep", "forward_keep+extras", "dlogits_from_kept"]
# The extras variants (entropy, Σp², argmax: what TRL's trainer logs) only for the 16-bit targets, to keep CI short.
EXTRAS_CASES = [(90, "bf16"), (80, "bf16")]
# The autotuner's 2-CTA grad-hidden candidate is for Hopper (on sm_80 it takes 128-166 registers: one CTA an SM,
# which the tuner's timing then weighs like any other candidate).
TWO_CTA_CASES = [(90, "bf16")]
# Registers per thread each kernel may use. The GEMM-shaped kernels run 8 warps (256 threads) a CTA: at <= 255
# registers one CTA fits an SM (65536 registers), which the default tiles are designed for (on sm_90a in bf16,
# docs/design.md: forward 255, logit gradient 238, grad-hidden 190); two CTAs an SM need <= 128: the autotuner's
# grad-hidden candidate (config.GH_TWO_CTAS). The fast backward's elementwise kernel has no product and must leave room
# for 8 CTAs an SM.
REGISTER_BUDGET = {"forward": 255, "forward+extras": 255, "dlogits": 255, "grad_weight": 255, "grad_hidden": 255,
                   "grad_hidden_2cta": 128, "forward_keep": 255, "forward_keep+extras": 255, "dlogits_from_kept": 64}
# Spill-store bytes allowed: none, except the forwards with the extras, whose three more running statistics
# spill a few bytes at the 128x128 tiles (measured: 32 lean, 60 fast on sm_90; a GPU run decides whether
# smaller tiles pay, benchmarks/tune.py).
# The kernels are compiled with a softcap, whose accurate tanh (a polynomial and an exp, both evaluated) costs fast
# mode's forward 32 bytes more (measured: 32 without the extras, 72 with; a GPU run decides whether it matters).
SPILL_BUDGET = {"forward+extras": 64, "forward_keep+extras": 72, "forward_keep": 32,
                # fp32 inputs take exact FMA products (the exactness path, not a speed target): 8 bytes measured.
                ("forward_keep", "fp32"): 16}
# Kernels whose main loop is a tensor-core product (the elementwise one has none).
MMA_KERNELS = {"forward", "forward+extras", "dlogits", "grad_weight", "grad_hidden", "grad_hidden_2cta",
               "forward_keep", "forward_keep+extras"}
MMA_INSTRUCTION = {80: "mma.sync", 86: "mma.sync", 89: "mma.sync", 90: "wgmma.mma_async", 100: "tcgen05.mma",
                   120: "mma.sync"}
# Shared memory a block may use (opt-in maximum) per target.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# Integer arguments that a launch at a real head (llama3-8b: H=4096, V=128256, chunks of 4096) passes as multiples
# of 16, which Triton's launcher specialises as divisible by 16 (as it does pointers and strides): the sizes, the
# vocabulary chunk's start and width, the kept columns. (min_programs and the split count depend on the GPU.)
DIVISIBLE_INTS = ("H", "V", "v0", "vc", "V_keep")


def _targets_blackwell() -> bool:
    import importlib.metadata

    major, minor = (int(p) for p in importlib.metadata.version("triton").split(".")[:2])
    return (major, minor) >= (3, 3)


def cases_of(name):
    if name == "grad_hidden_2cta":
        return TWO_CTA_CASES
    if name.endswith("+extras"):
        return EXTRAS_CASES
    return CASES + [(a, d) for a, d in OTHER_ARCHS if a < 100 or _targets_blackwell()]


def _params(cases=None, names=KERNEL_NAMES):
    return [(n, a, d) for n in names for a, d in cases_of(n) if cases is None or (a, d) in cases]


def _ptxas_report(ptx, arch):
    """``(registers, spill-store bytes)`` ptxas reports for this PTX (the same ptxas Triton uses for ``arch``)."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, f"-arch={sm_arch_from_capability(arch)}", "-v", f.name,
                              "-o", os.devnull], capture_output=True, text=True)
    text = out.stdout + out.stderr
    spills = re.findall(r"(\d+) bytes spill stores", text)
    regs = re.findall(r"Used (\d+) registers", text)
    if out.returncode != 0 or not spills or not regs:
        return f"ptxas failed: {out.stderr[-300:]}", None
    return max(map(int, regs)), sum(map(int, spills))


def _compile_all():
    """Compile every kernel for every case; returns {"name/arch/dtype": shared bytes or error text}."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdpo.kernels import logprob_bwd, logprob_fast, logprob_fwd
    from fastdpo.kernels.config import GH_TWO_CTAS, default_config

    def grad_hidden(C):
        # A middle chunk's: it reads and writes the fp32 accumulator.
        return (logprob_bwd._grad_hidden_kernel, C.gh_warps, C.gh_stages,
                dict(FIRST=False, LAST=False, BLOCK_M=C.gh_block_m, BLOCK_H=C.gh_block_h, BLOCK_K=C.gh_block_k))

    def kernels_for(C):
        def forward(extras, keep):
            return (logprob_fwd._logprob_fwd_kernel, C.fwd_warps, C.fwd_stages,
                    dict(HAS_BIAS=True, HAS_SOFTCAP=True, EXTRAS=extras, KEEP=keep, BLOCK_M=C.fwd_block_m,
                         BLOCK_V=C.fwd_block_v, BLOCK_K=C.fwd_block_k))

        return {
            "forward": forward(False, False), "forward+extras": forward(True, False),
            "forward_keep": forward(False, True), "forward_keep+extras": forward(True, True),
            "dlogits": (logprob_bwd._dlogits_kernel, C.dlogits_warps, C.dlogits_stages,
                        dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_M=C.dlogits_block_m, BLOCK_V=C.dlogits_block_v,
                             BLOCK_K=C.dlogits_block_k)),
            "grad_weight": (logprob_bwd._grad_weight_kernel, C.gw_warps, C.gw_stages,
                            dict(HAS_BIAS=True, BLOCK_V=C.gw_block_v, BLOCK_H=C.gw_block_h, BLOCK_K=C.gw_block_k)),
            "grad_hidden": grad_hidden(C),
            "grad_hidden_2cta": grad_hidden(dataclasses.replace(C, **GH_TWO_CTAS)),
            "dlogits_from_kept": (logprob_fast._dlogits_from_kept_kernel, C.kept_warps, 1,
                                  dict(HAS_SOFTCAP=True, FWD_BLOCK_V=C.fwd_block_v, BLOCK_M=C.kept_block_m,
                                       BLOCK_V=C.kept_block_v)),
        }
    # Pointer arguments whose dtype does not follow the inputs'.
    fixed = {"rows_ptr": "*i64", "tgt_ptr": "*i64", "nv_ptr": "*i32", "stats_ptr": "*fp32", "lse_ptr": "*fp32",
             "g_ptr": "*fp32", "acc_ptr": "*fp32", "gscale_ptr": "*fp32", "mt_ptr": "*fp32", "zt_ptr": "*fp32"}
    # Strides that are 1 on contiguous inputs; Triton's launcher turns those into constants.
    unit = {"forward": ("stride_xh", "stride_wh"), "dlogits": ("stride_xh", "stride_wh"),
            "grad_weight": ("stride_xh", "stride_gwh"), "grad_hidden": ("stride_wh",),
            "grad_hidden_2cta": ("stride_wh",),
            "forward_keep": ("stride_xh", "stride_wh"), "dlogits_from_kept": ()}
    unit["forward+extras"], unit["forward_keep+extras"] = unit["forward"], unit["forward_keep"]
    results = {}
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for name in KERNEL_NAMES:
        for arch, dtype in cases_of(name):
            # The config the launcher picks for this dtype and GPU generation.
            config = default_config(torch_dtype[dtype], (arch // 10, arch % 10))
            kernel, warps, stages, constexprs = kernels_for(config)[name]
            const = dict(constexprs)
            if "DOT_F32" in kernel.arg_names:
                const.update(DOT_F32=False, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
            const.update({arg: 1 for arg in unit[name]})
            if name.startswith(("grad_weight", "grad_hidden")):
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
                if arg.endswith("_ptr") or arg.startswith("stride") or arg in DIVISIBLE_INTS:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            key = f"{name}/{arch}/{dtype}"
            try:
                compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                          options=dict(num_warps=warps, num_stages=stages))
                ttgir = compiled.asm["ttgir"]
                ptx = compiled.asm["ptx"]
                registers, spills = _ptxas_report(ptx, arch)
                results[key] = {"shared": compiled.metadata.shared, "cubin": bool(compiled.asm.get("cubin")),
                                "async_copies": ttgir.count("async_copy_global_to_local"),
                                "registers": registers, "spill_bytes": spills, "warps": warps,
                                "mma": {ins: ptx.count(ins) for ins in ("wgmma.mma_async", "mma.sync", "tcgen05.mma")},
                                "tma": ptx.count("cp.async.bulk.tensor")}
            except Exception as err:  # noqa: BLE001 - reported per kernel by the test
                results[key] = f"{type(err).__name__}: {err}"
    return results


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, arch, dtype", _params())
def test_kernel_compiles_for_gpu(compiled, name, arch, dtype):
    result = compiled[f"{name}/{arch}/{dtype}"]
    assert isinstance(result, dict), result
    assert result["cubin"]
    # The tiles must fit one block's shared memory on the target (227 KiB on sm_90, 99 KiB on sm_86/89/120).
    assert result["shared"] <= SHARED_LIMIT[arch]
    if name in MMA_KERNELS:
        assert result["async_copies"] > 0, "the K loop is not pipelined"


@pytest.mark.parametrize("name, arch, dtype", _params())
def test_kernel_registers_fit_the_budget_without_spills(compiled, name, arch, dtype):
    result = compiled[f"{name}/{arch}/{dtype}"]
    assert isinstance(result, dict), result
    assert isinstance(result["registers"], int), result["registers"]
    # A spill to local memory costs every iteration of the K loop a round trip.
    allowed = SPILL_BUDGET.get((name, dtype), SPILL_BUDGET.get(name, 0))
    assert result["spill_bytes"] <= allowed, f"{result['spill_bytes']} bytes of register spills"
    assert result["registers"] <= REGISTER_BUDGET[name], (
        f"{result['registers']} registers a thread, budget {REGISTER_BUDGET[name]}")
    # Registers decide how many CTAs share an SM (65536 registers each on sm_80 and sm_90).
    assert result["registers"] * 32 * result["warps"] <= 65536


@pytest.mark.parametrize("name, arch, dtype", _params([c for c in CASES + OTHER_ARCHS if c[1] != "fp32"],
                                                      sorted(MMA_KERNELS)))
def test_products_run_on_tensor_cores(compiled, name, arch, dtype):
    """16-bit products use the generation's MMA: warpgroup wgmma on Hopper, tcgen05 on datacenter Blackwell,
    mma.sync on the others (fp32 inputs with exact fp32 products run on the FMA units by design)."""
    mma = compiled[f"{name}/{arch}/{dtype}"]["mma"]
    assert mma[MMA_INSTRUCTION[arch]] > 0, mma
    if MMA_INSTRUCTION[arch] == "mma.sync":
        assert mma["wgmma.mma_async"] == 0 and mma["tcgen05.mma"] == 0


def table(results: dict) -> str:
    """The figures as a markdown table (``python tests/test_kernels_compile.py --table``)."""
    lines = ["| kernel | target | registers | spill bytes | shared KiB | MMA | async copies | TMA |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name, arch, dtype = key.split("/")
        if not isinstance(r, dict):
            lines.append(f"| {name} | sm_{arch} {dtype} | failed: {r[:60]} | | | | | |")
            continue
        mma = ", ".join(f"{k.split('.')[0]} x{v}" for k, v in r["mma"].items() if v) or "none (FMA)"
        shared_kib = r["shared"] / 1024
        lines.append(f"| {name} | sm_{arch} {dtype} | {r['registers']} | {r['spill_bytes']} | {shared_kib:.0f} | "
                     f"{mma} | {r['async_copies']} | {r['tma']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    results = _compile_all()
    print(table(results) if "--table" in sys.argv else json.dumps(results))
