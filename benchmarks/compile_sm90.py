"""Compile the fused routed-layer Triton kernels for sm_90 (H100/H200), or another target, on any machine, GPU or not.

    python benchmarks/compile_sm90.py [--arch 80] [--all-configs | --quick] [--sass]

The CPU tests run the kernels under TRITON_INTERPRET=1, which executes them but never compiles them, so a
kernel the real compiler rejects (e.g. a variable whose type differs between the branches of a runtime `if`)
passes there and fails on the first GPU. This builds each kernel variant down to a cubin for sm_90 and prints
its shared-memory use; tests/test_routed_kernels.py runs it in a subprocess (without the interpreter).
`--sass` also prints, for each NF4 small-T kernel, the instruction mix of its K loop's body per weight element
(from nvdisasm: the longest loop closed by a backward branch, counted once, over the weights a thread dequantizes
per step); the counts RESULTS quotes come from it (with the triton of the GPU image, e.g. installed by
`pip install --target DIR triton==3.6.0 --no-deps` and put first on PYTHONPATH).

`--arch CC` builds for sm_CC instead (75, 80, 86, 89, 90, 100, 120): only the kernels the dispatch runs there (the
TMA base GEMM needs sm_90+, the Gluon one sm_90 exactly, the Gluon NF4 decode sm_80+), and every kernel's dynamic
shared memory is checked against the target's per-block limit (SMEM_LIMIT): a kernel launched at one fixed config
must fit. `--all-configs` also builds every config each autotuner (and each hand-rolled tuner) may pick, plus the
MOL_TRITON_AUTOTUNE=0 ones, and reports how many fit: the autotuner skips one that does not (Triton raises
OutOfResources at its launch), so each tuner needs one that fits, and a fixed config must. Exit status 1 if not.
`--quick` builds one variant of each kernel and path (tests/test_routed_kernels.py's check for sm_80, in seconds).
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mol.kernels import routed_lora as rl  # noqa: E402

ARCH = int(sys.argv[sys.argv.index("--arch") + 1]) if "--arch" in sys.argv else 90
SM = f"sm_{ARCH}"
tgt = GPUTarget("cuda", ARCH, 32)
# the most dynamic shared memory a block may opt into, per target (CUDA programming guide, compute capabilities
# table): the Triton launcher raises OutOfResources above it
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 120: 99 * 1024}
LIMIT = SMEM_LIMIT.get(ARCH, 99 * 1024)
PROBLEMS: list[str] = []
QUICK = "--quick" in sys.argv
_BUILT: set = set()


def _skip(key) -> bool:
    """--quick: whether a variant of this kernel and path (key) was built already."""
    if not QUICK:
        return False
    seen = key in _BUILT
    _BUILT.add(key)
    return seen


def _check_fits(what, shared):
    """Record a fixed-config kernel whose dynamic shared memory passes the target's limit (fails at launch)."""
    if shared > LIMIT:
        PROBLEMS.append(f"{what}: {shared} bytes of shared memory, over {SM}'s {LIMIT}")
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin):
    """cuobjdump's REG / STACK / SHARED (static) / LOCAL line of the cubin as a match, or None."""
    if not os.path.exists(_CUOBJDUMP):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)


def comp(fn, sig, const, maxnreg=None, usage=False, label=""):
    if _skip((fn.__name__, "FMA" in label)):
        return
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    k = triton.compile(src, target=tgt, options={"num_warps": 4, "num_stages": 3,
                                                 **({"maxnreg": maxnreg} if maxnreg else {})})
    ru = _resource_usage(k.asm["cubin"]) if usage else None
    regs = f", {ru.group(1)} registers, {ru.group(2)} bytes of stack" if ru else ""
    print(f"{fn.__name__}{label}: compiled for {SM}, {k.metadata.shared} bytes of shared memory{regs}")
    _check_fits(f"{fn.__name__}{label}", k.metadata.shared)


def fnk(k):
    return k.fn if hasattr(k, "fn") else k


sig = {"x_ptr": "*bf16", "xl_ptr": "*bf16", "a_ptr": "*bf16", "wr_ptr": "*fp32", "hl_ptr": "*fp32", "stats_ptr": "*fp32", "T": "i32", "N_IN": "i32", "R": "i32", "E": "i32", "T_BUCKET": "i32",
       "EP": "constexpr", "BT": "constexpr", "BR": "constexpr", "BK": "constexpr", "SPLIT": "constexpr", "F32_DOT": "constexpr", "IEEE": "constexpr", "ROUTER_X2": "constexpr"}
for split, x2 in ((1, False), (2, False), (1, True)):
    comp(fnk(rl._route_shrink_kernel), sig, {"EP": 16, "BT": 64, "BR": 128, "BK": 64, "SPLIT": split, "F32_DOT": False, "IEEE": False,
                                             "ROUTER_X2": x2})
# the one-GEMM shrink's operand: A_cat (in x's dtype, or float32 adapters rounded here) and the router's 16-bit
# parts, for bf16 and fp16
for dt in ("bf16", "fp16"):
    for a_dt in (dt, "fp32"):
        comp(rl._router_parts_kernel, {"a_ptr": f"*{a_dt}", "wr_ptr": "*fp32", "out_ptr": f"*{dt}", "stats_ptr": "*fp32",
                                       "R": "i32", "E": "i32", "N_IN": "i32", "c": "fp32", "NPARTS": "constexpr",
                                       "EP": "constexpr", "BLOCK": "constexpr", "A_CAST": "constexpr"},
             {"NPARTS": rl.ROUTER_PARTS, "EP": 16, "BLOCK": 1024, "A_CAST": a_dt == "fp32"})
sig = {"hl_ptr": "*fp32", "noise_ptr": "*fp32", "w_ptr": "*fp32", "n_ptr": "*fp32", "gates_ptr": "*fp32", "ids_ptr": "*i64", "u_ptr": "*bf16", "stats_ptr": "*fp32", "aux_ptr": "*fp32",
       "scale": "fp32", "c_lb": "fp32", "c_z": "fp32", "T": "i32", "R": "i32", "E": "i32", "LD": "i32", "part_scale": "fp32",
       "RANK": "constexpr", "K": "constexpr", "KIND": "constexpr", "EP": "constexpr", "BT": "constexpr", "BR": "constexpr", "HAS_NOISE": "constexpr",
       "HAS_W": "constexpr", "SELECT": "constexpr", "NPARTS": "constexpr"}
for (kind, K), select in itertools.product(((0, 2), (1, 1), (2, 8)), (False, True)):
    # NPARTS: the router's scores as one sum (Triton shrink) or as the one-GEMM shrink's parts; HAS_W: padding
    # left out of the router losses, as a padded batch of an HF model gives it
    comp(rl._gate_fwd_kernel, sig, {"RANK": 16, "K": K, "KIND": kind, "EP": 16, "BT": 32, "BR": 128, "HAS_NOISE": kind == 0, "SELECT": select,
                                    "NPARTS": rl.ROUTER_PARTS if select == (kind == 0) else 1, "HAS_W": select})
sig = {"du_ptr": "*fp32", "hl_ptr": "*fp32", "noise_ptr": "*fp32", "w_ptr": "*fp32", "n_ptr": "*fp32", "gates_ptr": "*fp32", "ids_ptr": "*i64", "stats_ptr": "*fp32", "daux_ptr": "*fp32", "dhl_ptr": "*bf16",
       "scale": "fp32", "c_lb": "fp32", "c_z": "fp32", "T": "i32", "R": "i32", "E": "i32", "LD": "i32", "SDT": "i32", "SDC": "i32",
       "RANK": "constexpr", "K": "constexpr", "KIND": "constexpr", "EP": "constexpr", "BT": "constexpr", "BR": "constexpr", "HAS_NOISE": "constexpr", "HAS_AUX": "constexpr",
       "HAS_W": "constexpr", "SELECT": "constexpr"}
for (kind, K), select in itertools.product(((0, 2), (1, 1), (2, 8)), (False, True)):
    comp(rl._gate_bwd_kernel, sig, {"RANK": 16, "K": K, "KIND": kind, "EP": 16, "BT": 32, "BR": 128, "HAS_NOISE": False, "HAS_AUX": True,
                                    "SELECT": select, "HAS_W": select})
comp(rl._aux_kernel, {"stats_ptr": "*fp32", "aux_ptr": "*fp32", "E": "i32", "c_lb": "fp32", "c_z": "fp32", "EP": "constexpr"}, {"EP": 16})

# the small-T (decode) forward: shrink producers, one routing program and the GEMV + experts consumers, one launch;
# the first two also with float32 adapters, which the kernel rounds as it loads them (A_CAST, B_CAST): registers and
# stack printed for each, to compare
for fma, has_w, kind, K, noise, bias, dt, bn, bk, ad in (
        (True, True, 0, 2, False, True, "bf16", 16, 256, "bf16"), (True, True, 0, 2, False, True, "bf16", 16, 256, "fp32"),
        (False, True, 0, 2, True, False, "bf16", 32, 128, "bf16"), (False, True, 0, 2, True, False, "bf16", 32, 128, "fp32"),
        (False, False, 2, 8, False, False, "bf16", 64, 256, "bf16"), (True, False, 1, 1, False, False, "fp32", 8, 512, "fp32"),
        (False, True, 0, 4, False, False, "fp16", 64, 256, "fp16")):
    sig = {"x_ptr": f"*{dt}", "xl_ptr": f"*{dt}", "a_ptr": f"*{ad}", "wr_ptr": "*fp32", "acc_ptr": "*fp32", "sync_ptr": "*i32", "noise_ptr": "*fp32",
           "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "base_ptr": f"*{dt}", "b_ptr": f"*{ad}", "y_ptr": f"*{dt}",
           "hl_ptr": "*fp32", "gates_ptr": "*fp32", "ids_ptr": "*i64", "u_ptr": f"*{dt}", "stats_ptr": "*fp32", "aux_ptr": "*fp32",
           "prof_ptr": "*i64", "scale": "fp32", "c_lb": "fp32", "c_z": "fp32", "T": "i32", "N_IN": "i32", "N_OUT": "i32", "R": "i32", "E": "i32",
           "stride_be": "i32", "stride_bn": "i32"}
    const = {"N_PART": 8, "RANK": 16, "K": K, "KIND": kind, "EP": 16, "BRS": 32, "BKS": 128, "BR": 128, "BN": bn, "BK": bk, "FMA": fma,
             "HAS_W": has_w, "HAS_BIAS": bias, "HAS_NOISE": noise, "F32_DOT": False, "IEEE": dt == "fp32",
             "PROF": fma and has_w, "ROUTER_X2": kind == 0, "A_CAST": ad != dt, "B_CAST": ad != dt}
    sig.update({k: "constexpr" for k in const})
    comp(rl._small_t_kernel, sig, const, maxnreg=168 if fma else None,  # as the capped FMA configs run
         usage=True, label=f" ({'FMA' if fma else 'dot'} BN={bn} BK={bk}, x {dt}, adapters {ad})")

# the base GEMM with the experts' product as extra K (mol/kernels/base_gemm.py): forward (b, v stored (N, K), with a
# bias) and backward (b, v row-major) forms, at every config it autotunes
from mol.kernels import base_gemm as bg  # noqa: E402

# (sm_90+ only: TMA descriptors; base_gemm.triton_supported gates it)
# the forward form (W and B_cat stored (N, K)) and the backward's (W and [A_cat; Wr] (K, N), dhl stored token-minor)
_FORMS = ((True, True, "bf16"), (False, False, "fp16"))
for cfg, (b_t, bias, dt) in itertools.product(bg.CONFIGS if ARCH >= 90 else [], _FORMS):
    bm, bn, bk, group_m, warps, stages, epi = cfg
    sig = {"a_desc": f"tensordesc<{dt}[{bm}, {bk}]>", "b_desc": f"tensordesc<{dt}[{bn}, {bk}]>" if b_t else f"tensordesc<{dt}[{bk}, {bn}]>",
           "u_desc": f"tensordesc<{dt}[{bm}, {bk}]>" if b_t else f"tensordesc<{dt}[{bk}, {bm}]>", "v_desc": f"tensordesc<{dt}[{bn}, {bk}]>" if b_t else f"tensordesc<{dt}[{bk}, {bn}]>",
           "c_desc": f"tensordesc<{dt}[{bm}, {bn // epi}]>", "bias_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "KR": "i32"}
    const = dict(BM=bm, BN=bn, BK=bk, GROUP_M=group_m, B_T=b_t, U_T=not b_t, V_T=b_t, HAS_U=True, HAS_BIAS=bias, EPI_SPLIT=epi, NUM_PROGS=132,
                 F32_DOT=False)
    sig.update({k: "constexpr" for k in const})
    k = triton.compile(ASTSource(fn=bg._base_gemm_kernel, signature=sig, constexprs=const), target=tgt,
                       options={"num_warps": warps, "num_stages": stages})
    # autotuned (base_gemm._choose leaves out a config that fails): on sm_120's 99 KB none fits, cuBLAS runs
    print(f"_base_gemm_kernel {cfg} b_t={b_t}: compiled for {SM}, {k.metadata.shared} bytes of shared memory")


# ---------------------------------------------------------------- the given-routing path's gate kernels, grouped_lora.py
# (grouped_lora_linear / the sequence router with DENSE_GEMMS: u = scale*g*h before the base GEMM, and the backward's
# dh (token-minor strides), u and dgates), at E=8 top-2 r=16 (R = 128)
from mol.kernels import grouped_lora as gl  # noqa: E402

comp(gl._gated_kernel, {"h_ptr": "*fp32", "gates_ptr": "*fp32", "ids_ptr": "*i64", "u_ptr": "*bf16", "scale": "fp32", "T": "i32",
                        "R": "i32", "RANK": "constexpr", "K": "constexpr", "BT": "constexpr", "BRP": "constexpr"},
     {"RANK": 16, "K": 2, "BT": 32, "BRP": 128})
comp(gl._bwd_epilogue_kernel, {"du_ptr": "*fp32", "h_ptr": "*fp32", "gates_ptr": "*fp32", "ids_ptr": "*i64", "dh_ptr": "*bf16",
                               "u_ptr": "*bf16", "dgates_ptr": "*fp32", "scale": "fp32", "T": "i32", "R": "i32", "SDT": "i32",
                               "SDC": "i32", "RANK": "constexpr", "K": "constexpr", "BT": "constexpr", "BRP": "constexpr"},
     {"RANK": 16, "K": 2, "BT": 32, "BRP": 128})

# ---------------------------------------------------------------- NF4 small-T (decode) kernel, mol/kernels/nf4.py
# Every autotuned config of both paths (FMA: T <= 2, tl.dot: T <= 16), plus dtype / nesting / bias / shape variants.
# Pointers and the row strides are marked 16-divisible, as the JIT specializes them for aligned tensors (without
# that the 128-bit code loads are not formed). Prints registers / stack (spills) / shared memory from the cubin.
from mol.kernels import nf4 as nf4k  # noqa: E402


def _resources(cubin, usage=None):
    """The cubin's registers, stack, local and static shared memory as text (`usage`: its _resource_usage)."""
    m = usage or _resource_usage(cubin)
    # SHARED: static shared memory (LUT=5's pair table), which Triton's metadata.shared (dynamic) leaves out
    return (f"{m[1]} registers, {m[2]} bytes stack, {m[4]} bytes local, {m[3]} bytes static shared" if m
            else "registers ?")


def _fits_48k(what, usage, dynamic):
    """Fail if static (`usage`: _resource_usage) plus dynamic shared memory pass 48 KiB while the dynamic part alone
    does not: Triton opts a launch into more only when its own (dynamic) part needs it, so a static table plus
    Triton's part above 48 KiB fails at launch ("invalid argument", RESULTS run 39)."""
    static = int(usage[3]) if usage else 0
    # a dynamic part above 48 KiB alone is opted in (with the static part beside it; e.g. the dot path's
    # (64, 128-byte, 3-stage) tile takes 52 KiB on sm_80), so only a dynamic part under it with a static table fails
    if dynamic <= 48 * 1024 < static + dynamic or static + dynamic > LIMIT:
        raise SystemExit(f"{what}: {static} static + {dynamic} dynamic bytes of shared memory pass the 48 KiB a "
                         "launch gets without opting in")


_SHARED_OPS = ("LDS", "STS", "LDSM", "STSM")


def _loop_mix(cubin, weights_per_thread):
    """(instructions, shared-memory ops, {opcode: count}) per weight element of the cubin's longest loop body."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        lines = subprocess.run([os.path.join(os.path.dirname(_CUOBJDUMP), "nvdisasm"), "-c", f.name],
                               capture_output=True, text=True).stdout.splitlines()
    labels = {m[1]: i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = [(labels[m[1]], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m[1], i) < i]
    loops = [(a, b) for a, b in loops if b - a > 32]  # not the split-K sum's or a wait's few-instruction loop
    if not loops:
        return None  # the K loop was unrolled (a step count of one or two)
    start, end = max(loops, key=lambda se: se[1] - se[0])
    ops = [m[1].split(".")[0] for line in lines[start:end + 1]
           if (m := re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line))]
    counts = {op: ops.count(op) / weights_per_thread for op in sorted(set(ops), key=ops.count, reverse=True)}
    return len(ops) / weights_per_thread, sum(counts.get(o, 0) for o in _SHARED_OPS), counts


def comp_nf4(cfg, T=1, K=4096, BS=64, nested=True, bias=False, xdt="bf16"):
    block_t = T if T <= nf4k.SMALL_FMA_MAX_T else 16
    if ARCH < 80 and (xdt == "bf16" or block_t > 2):
        return  # bf16x2 arithmetic needs sm_80; below it NF4Linear runs only the FMA path, float16 / float32 x
    if _skip(("nf4", block_t > 2, cfg["LUT"])):
        return
    sig = {"x_ptr": f"*{xdt}", "codes_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
           "nabs_ptr": "*fp32", "ncode_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": f"*{xdt}", "y_ptr": f"*{xdt}",
           "ws_ptr": "*fp32", "ticket_ptr": "*i32", "T": "i32", "N": "i32", "stride_xt": "i32", "stride_yt": "i32"}
    const = dict(K=K, BS=BS, NBS=256, NESTED=nested, HAS_BIAS=bias, BLOCK_T=block_t, IEEE=xdt == "fp32",
                 **{"SPLIT_K": 1, **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}})
    sig.update({k: "constexpr" for k in const})
    div16 = {"stride_xt", "stride_yt", "N"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n].startswith("*") or n in div16}
    src = ASTSource(fn=nf4k._nf4_matmul_small_kernel, signature=sig, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=tgt, options={"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 1)})
    path = "dot" if block_t > 2 else "fma"
    usage = _resource_usage(k.asm["cubin"])
    print(f"nf4 small-T {path} T={T} K={K} bs={BS} {xdt} nested={nested} bias={bias} {cfg}: built for {SM}, "
          f"{_resources(k.asm['cubin'], usage)}, {k.metadata.shared} bytes shared")
    _fits_48k(f"nf4 small-T {cfg}", usage, k.metadata.shared)
    _check_fits(f"nf4 small-T {cfg}", k.metadata.shared)
    if "--sass" in sys.argv:
        mix = _loop_mix(k.asm["cubin"], cfg["BLOCK_N"] * cfg["BLOCK_KB"] * 2 / (32 * cfg["num_warps"]))
        if mix is None:
            print("    no K loop in the SASS (its steps were unrolled)")
        else:
            total, shared, counts = mix
            top = ", ".join(f"{op} {n:.2f}" for op, n in list(counts.items())[:12])
            print(f"    K loop per weight (triton {triton.__version__}): {total:.2f} instructions, {shared:.2f} "
                  f"shared-memory ops; {top}")


for c in nf4k.FMA_CONFIGS:
    comp_nf4(c, T=1)
    comp_nf4(c, T=2, bias=True)
for c in nf4k.DOT_CONFIGS:
    comp_nf4(c, T=16)
comp_nf4(nf4k.FMA_CONFIGS[0], T=1, nested=False, bias=True, xdt="fp16")
comp_nf4(nf4k.FMA_CONFIGS[1], T=2, xdt="fp32")
comp_nf4(nf4k.FMA_CONFIGS[1], T=1, K=14336)
comp_nf4(nf4k.FMA_CONFIGS[2], T=1, K=192, BS=128)  # BLOCK_KB does not divide the row: masked steps
comp_nf4(nf4k.DOT_CONFIGS[0], T=5, nested=False, bias=True, xdt="fp16")
comp_nf4(nf4k.DOT_CONFIGS[1], T=16, K=14336)
comp_nf4(nf4k.DOT_CONFIGS[0], T=16, K=320, BS=32, xdt="fp32")
comp_nf4(dict(nf4k.FMA_CONFIGS[0], SPLIT_K=4), T=1)  # split-K: partials, ticket, last-arriver sum
comp_nf4(dict(nf4k.FMA_CONFIGS[0], SPLIT_K=4), T=2, bias=True)
comp_nf4(dict(nf4k.DOT_CONFIGS[1], SPLIT_K=8), T=16)
comp_nf4(dict(nf4k.DOT_CONFIGS[0], SPLIT_K=3, num_stages=3), T=16, K=14336)

# ---------------------------------------------------------------- NF4 decode on tensor cores from registers (Gluon)
# the same function as one Gluon pipeline (mol/kernels/base_gemm_gluon.py), at every config it tunes: the forward
# form with a bias, the backward form (fp16), and the bare base GEMM
from mol.kernels import base_gemm_gluon as bgg  # noqa: E402


def _gluon_desc(shape, dt):
    from triton.experimental.gluon import language as ttgl
    layout = ttgl.NVMMASharedLayout.get_default_for(shape, ttgl.bfloat16 if dt == "bf16" else ttgl.float16)
    return f"tensordesc<{dt}[{shape[0]}, {shape[1]}],{layout!r}>"


if bgg.AVAILABLE and ARCH == 90:  # wgmma: base_gemm_gluon.supported gates it to sm_90
    from triton.experimental.gluon._runtime import GluonASTSource
    for cfg, (b_t, bias, dt, has_u) in itertools.product(bgg.CONFIGS, ((True, True, "bf16", True), (False, False, "fp16", True),
                                                                       (True, False, "bf16", False))):
        _, bm, bn, bk, group_m, warps, stages, epi = cfg
        sig = {"a_desc": _gluon_desc([bm, bk], dt), "b_desc": _gluon_desc([bn, bk] if b_t else [bk, bn], dt),
               "u_desc": _gluon_desc([bm, bk] if b_t else [bk, bm], dt), "v_desc": _gluon_desc([bn, bk] if b_t else [bk, bn], dt),
               "c_desc": _gluon_desc([bm, bn // epi], dt), "bias_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "KR": "i32"}
        const = dict(GROUP_M=group_m, B_T=b_t, U_T=not b_t, HAS_U=has_u, HAS_BIAS=bias, STAGES=stages, EPI_SPLIT=epi, U_REG=bgg.U_REG,
                     num_warps=warps)
        sig.update({k: "constexpr" for k in const})
        k = triton.compile(GluonASTSource(fn=bgg._base_gemm_gluon_kernel, signature=sig, constexprs=const), target=tgt,
                           options={"num_warps": warps})
        print(f"_base_gemm_gluon_kernel {cfg} b_t={b_t} extra K={has_u}: compiled for {SM}, "
              f"{_resources(k.asm['cubin'])}, "
              f"{k.metadata.shared} bytes of shared memory")
elif bgg.AVAILABLE:
    print(f"gluon base GEMM: Hopper only (wgmma), none for {SM}")
else:
    print("gluon base GEMM: this Triton has no Gluon, not built")


# mol/kernels/nf4_mma.py: every config it tunes at T = 16 (bf16, double-quantized, K = 4096), then the variants: T <= 8
# (8-token MMA tiles), fp16, plain float32 absmax with a bias, blocksize 128, K = 14336 and a K the slab does not tile.
from mol.kernels import nf4_mma  # noqa: E402


def comp_nf4_mma(cfg, T=16, K=4096, BS=64, nested=True, bias=False, xdt="bf16"):
    from triton.experimental.gluon._runtime import GluonASTSource

    bt = 8 if T <= 8 else 16
    if _skip(("nf4_mma", cfg.get("pairs", False))):
        return
    cpl = nf4_mma._cpl(K, cfg["cpl"])
    w_l, x_l, s_l, mma = nf4_mma.layouts(cfg["warps_k"], cfg["warps_m"], cfg["m_rep"], bt, cpl)
    bm, nw = 16 * cfg["warps_m"] * cfg["m_rep"], cfg["warps_k"] * cfg["warps_m"]
    sig = {"x_ptr": f"*{xdt}", "codes_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
           "nabs_ptr": "*fp32", "ncode_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": f"*{xdt}", "y_ptr": f"*{xdt}",
           "ws_ptr": "*fp32", "ticket_ptr": "*i32", "T": "i32", "N": "i32", "stride_xt": "i32", "stride_yt": "i32"}
    const = dict(K=K, BS=BS, NBS=256, NESTED=nested, HAS_BIAS=bias, BT=bt, BM=bm, WK=cfg["warps_k"], CPL=cpl,
                 SPLIT_K=nf4_mma.splits(K, cpl, cfg["split_k"]), PREFETCH=cfg["prefetch"],
                 PAIRS=cfg.get("pairs", False), W_LAYOUT=w_l, X_LAYOUT=x_l, S_LAYOUT=s_l, MMA=mma)
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n].startswith("*")
             or n in ("stride_xt", "stride_yt", "N")}
    k = triton.compile(GluonASTSource(fn=nf4_mma._nf4_mma_kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=tgt, options={"num_warps": nw,
                                            **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {})})
    usage = _resource_usage(k.asm["cubin"])
    print(f"nf4 mma decode T={T} K={K} bs={BS} {xdt} nested={nested} bias={bias} {cfg}: compiled for {SM}, "
          f"{_resources(k.asm['cubin'], usage)}, {k.metadata.shared} bytes shared")
    _fits_48k(f"nf4 mma decode {cfg}", usage, k.metadata.shared)
    _check_fits(f"nf4 mma decode {cfg}", k.metadata.shared)
    if "--sass" in sys.argv:
        mix = _loop_mix(k.asm["cubin"], bm * 64 * cpl * cfg["warps_k"] / (32 * nw))
        if mix is not None:
            total, shared, counts = mix
            top = ", ".join(f"{op} {n:.2f}" for op, n in list(counts.items())[:12])
            print(f"    K loop per weight (triton {triton.__version__}): {total:.2f} instructions, {shared:.2f} "
                  f"shared-memory ops; {top}")


if nf4_mma.AVAILABLE and ARCH >= 80:  # mma.sync m16n8k16: nf4_mma.supported gates it to sm_80+
    for c in nf4_mma.CONFIGS:
        comp_nf4_mma(c)
    comp_nf4_mma(nf4_mma.CONFIGS[0], T=5)
    comp_nf4_mma(nf4_mma.CONFIGS[3], T=3, xdt="fp16")
    comp_nf4_mma(nf4_mma.CONFIGS[1], T=16, nested=False, bias=True)
    comp_nf4_mma(nf4_mma.CONFIGS[0], T=7, K=1152, BS=128, bias=True)
    comp_nf4_mma(nf4_mma.CONFIGS[5], T=16, K=14336)
    comp_nf4_mma(nf4_mma.CONFIGS[1], T=9, K=4160)  # 65 chunks: cpl 4 falls to 1
    comp_nf4_mma(nf4_mma.CONFIGS[-1], T=5, K=1152, BS=128, bias=True, xdt="fp16")  # pairs: fp16 levels, cpl 2
elif nf4_mma.AVAILABLE:
    print(f"nf4 mma decode: needs sm_80+, none for {SM}")
else:
    print("nf4 mma decode: this Triton has no Gluon, not built")


# ---------------------------------------------------------------- --all-configs: every config a tuner may pick
def _tuned(name, fn, sig, const, configs, fixed=None):
    """Build fn at each triton.Config of `configs` (and `fixed`, the MOL_TRITON_AUTOTUNE=0 config, which must
    fit); record a tuner none of whose configs fits the target's shared memory."""
    fits = []
    for c in configs + ([fixed] if fixed else []):
        opts = {"num_warps": c.num_warps, "num_stages": c.num_stages,
                **({"maxnreg": c.maxnreg} if getattr(c, "maxnreg", None) else {})}
        full = {**const, **c.kwargs}
        every = {**sig, **{n: "constexpr" for n in full}}
        ordered = {n: every[n] for n in fn.arg_names}  # the kernel's own argument order
        k = triton.compile(ASTSource(fn=fn, signature=ordered, constexprs=full), target=tgt, options=opts)
        ok = k.metadata.shared <= LIMIT
        print(f"{name} {c.kwargs} warps={c.num_warps} stages={c.num_stages}: config built for {SM}, "
              f"{k.metadata.shared} bytes of shared memory{'' if ok else ' (over the limit: skipped at run time)'}")
        if c is fixed and not ok:
            PROBLEMS.append(f"{name}: the MOL_TRITON_AUTOTUNE=0 config {c} does not fit {SM}")
        elif c is not fixed:
            fits.append(ok)
    print(f"{name}: {sum(fits)} of {len(fits)} autotuned configs fit {SM}")
    if not any(fits):
        PROBLEMS.append(f"{name}: none of its {len(fits)} autotuned configs fits {SM}'s {LIMIT} bytes")


def _fixed(configs_fn, *args):
    """The config list configs_fn builds with MOL_TRITON_AUTOTUNE=0 (its one config)."""
    os.environ["MOL_TRITON_AUTOTUNE"] = "0"
    try:
        return configs_fn(*args)[0]
    finally:
        del os.environ["MOL_TRITON_AUTOTUNE"]


if "--all-configs" in sys.argv:
    for dt in ("bf16", "fp16"):
        _tuned(f"_route_shrink_kernel {dt}", rl._route_shrink_kernel.fn,
               {"x_ptr": f"*{dt}", "xl_ptr": f"*{dt}", "a_ptr": f"*{dt}", "wr_ptr": "*fp32", "hl_ptr": "*fp32",
                "stats_ptr": "*fp32", "T": "i32", "N_IN": "i32", "R": "i32", "E": "i32", "T_BUCKET": "i32"},
               {"EP": 16, "F32_DOT": False, "IEEE": False, "ROUTER_X2": False},
               rl._shrink_configs(), _fixed(rl._shrink_configs))
        _tuned(f"grouped _shrink_kernel {dt}", gl._shrink_kernel.fn,
               {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "h_ptr": "*fp32", "T": "i32", "N_IN": "i32", "R": "i32",
                "T_BUCKET": "i32"}, {"F32_DOT": False, "IEEE": False},
               gl._configs("shrink"), _fixed(gl._configs, "shrink"))
        _tuned(f"grouped _expand_kernel {dt}", gl._expand_kernel.fn,
               {"base_ptr": f"*{dt}", "h_ptr": "*fp32", "b_ptr": f"*{dt}", "gates_ptr": "*fp32", "ids_ptr": "*i64",
                "out_ptr": f"*{dt}", "scale": "fp32", "T": "i32", "N_OUT": "i32", "R": "i32", "T_BUCKET": "i32"},
               {"RANK": 16, "K": 2, "F32_DOT": False, "IEEE": False},
               gl._configs("expand"), _fixed(gl._configs, "expand"))
        _tuned(f"grouped _du_kernel {dt}", gl._du_kernel.fn,
               {"dy_ptr": f"*{dt}", "b_ptr": f"*{dt}", "du_ptr": "*fp32", "T": "i32", "N_OUT": "i32", "R": "i32",
                "T_BUCKET": "i32", "stride_be": "i32", "stride_bn": "i32"},
               {"RANK": 16, "F32_DOT": False, "IEEE": False}, gl._configs("du"), _fixed(gl._configs, "du"))
        for fma in (True, False):
            sig = {"x_ptr": f"*{dt}", "xl_ptr": f"*{dt}", "a_ptr": f"*{dt}", "wr_ptr": "*fp32", "acc_ptr": "*fp32",
                   "sync_ptr": "*i32", "noise_ptr": "*fp32", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
                   "base_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "hl_ptr": "*fp32", "gates_ptr": "*fp32",
                   "ids_ptr": "*i64", "u_ptr": f"*{dt}", "stats_ptr": "*fp32", "aux_ptr": "*fp32", "prof_ptr": "*i64",
                   "scale": "fp32", "c_lb": "fp32", "c_z": "fp32", "T": "i32", "N_IN": "i32", "N_OUT": "i32",
                   "R": "i32", "E": "i32", "stride_be": "i32", "stride_bn": "i32"}
            const = {"N_PART": 16, "RANK": 16, "K": 2, "KIND": 0, "EP": 16, "BRS": 32, "BKS": 128, "BR": 128,
                     "FMA": fma, "HAS_W": True, "HAS_BIAS": False, "HAS_NOISE": False, "F32_DOT": False,
                     "IEEE": False, "PROF": False, "ROUTER_X2": False, "A_CAST": False, "B_CAST": False}
            _tuned(f"_small_t_kernel {'FMA' if fma else 'dot'} {dt}", rl._small_t_kernel, sig, const,
                   rl._small_t_configs(fma), _fixed(rl._small_t_configs, fma))
    # the NF4 kernels' tuners (FMA: T <= 2, dot: T <= 16) at every config, bf16
    for configs, T in ((nf4k.FMA_CONFIGS, 2), (nf4k.DOT_CONFIGS, 16)):
        for c in configs:
            comp_nf4(c, T=T)
        comp_nf4(configs[-1], T=T, xdt="fp16")
    for dt in ("bf16", "fp16"):
        comp(nf4k._nf4_dequant_kernel,
             {"codes_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "nabs_ptr": "*fp32", "ncode_ptr": "*fp32",
              "offset_ptr": "*fp32", "out_ptr": f"*{dt}", "n_bytes": "i32", "numel": "i32", "BS": "constexpr",
              "NBS": "constexpr", "NESTED": "constexpr", "LUT": "constexpr", "BLOCK": "constexpr"},
             {"BS": 64, "NBS": 256, "NESTED": True, "LUT": nf4k.DEQUANT_LUT, "BLOCK": 1024}, label=f" ({dt})")

if PROBLEMS:
    print("\n".join(["PROBLEMS:"] + PROBLEMS))
    sys.exit(1)
