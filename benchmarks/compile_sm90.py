"""Compile the fused routed-layer Triton kernels for sm_90 (H100/H200) on any machine, GPU or not.

    python benchmarks/compile_sm90.py

The CPU tests run the kernels under TRITON_INTERPRET=1, which executes them but never compiles them, so a
kernel the real compiler rejects (e.g. a variable whose type differs between the branches of a runtime `if`)
passes there and fails on the first GPU. This builds each kernel variant down to a cubin for sm_90 and prints
its shared-memory use; tests/test_routed_kernels.py runs it in a subprocess (without the interpreter).
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import routed_lora as rl  # noqa: E402

tgt = GPUTarget("cuda", 90, 32)


def comp(fn, sig, const):
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    k = triton.compile(src, target=tgt, options={"num_warps": 4, "num_stages": 3})
    print(f"{fn.__name__}: compiled for sm_90, {k.metadata.shared} bytes of shared memory")


def fnk(k):
    return k.fn if hasattr(k, "fn") else k


sig = {"x_ptr": "*bf16", "xl_ptr": "*bf16", "a_ptr": "*bf16", "wr_ptr": "*fp32", "hl_ptr": "*fp32", "stats_ptr": "*fp32", "T": "i32", "N_IN": "i32", "R": "i32", "E": "i32", "T_BUCKET": "i32",
       "EP": "constexpr", "BT": "constexpr", "BR": "constexpr", "BK": "constexpr", "SPLIT": "constexpr", "F32_DOT": "constexpr", "IEEE": "constexpr"}
for split in (1, 2):
    comp(fnk(rl._route_shrink_kernel), sig, {"EP": 16, "BT": 64, "BR": 128, "BK": 64, "SPLIT": split, "F32_DOT": False, "IEEE": False})
sig = {"hl_ptr": "*fp32", "noise_ptr": "*fp32", "gates_ptr": "*fp32", "ids_ptr": "*i64", "u_ptr": "*bf16", "stats_ptr": "*fp32", "aux_ptr": "*fp32",
       "scale": "fp32", "c_lb": "fp32", "c_z": "fp32", "T": "i32", "R": "i32", "E": "i32",
       "RANK": "constexpr", "K": "constexpr", "KIND": "constexpr", "EP": "constexpr", "BT": "constexpr", "BR": "constexpr", "HAS_NOISE": "constexpr"}
for kind, K in ((0, 2), (1, 1), (2, 8)):
    comp(rl._gate_fwd_kernel, sig, {"RANK": 16, "K": K, "KIND": kind, "EP": 16, "BT": 32, "BR": 128, "HAS_NOISE": kind == 0})
sig = {"du_ptr": "*fp32", "hl_ptr": "*fp32", "noise_ptr": "*fp32", "gates_ptr": "*fp32", "ids_ptr": "*i64", "stats_ptr": "*fp32", "daux_ptr": "*fp32", "dhl_ptr": "*bf16",
       "scale": "fp32", "c_lb": "fp32", "c_z": "fp32", "T": "i32", "R": "i32", "E": "i32",
       "RANK": "constexpr", "K": "constexpr", "KIND": "constexpr", "EP": "constexpr", "BT": "constexpr", "BR": "constexpr", "HAS_NOISE": "constexpr", "HAS_AUX": "constexpr"}
for kind, K in ((0, 2), (1, 1), (2, 8)):
    comp(rl._gate_bwd_kernel, sig, {"RANK": 16, "K": K, "KIND": kind, "EP": 16, "BT": 32, "BR": 128, "HAS_NOISE": False, "HAS_AUX": True})
comp(rl._aux_kernel, {"stats_ptr": "*fp32", "aux_ptr": "*fp32", "E": "i32", "c_lb": "fp32", "c_z": "fp32", "EP": "constexpr"}, {"EP": 16})
