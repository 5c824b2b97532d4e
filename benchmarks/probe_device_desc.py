"""The base GEMM's TMA descriptors made on the device (base_gemm.DEVICE_DESCRIPTORS) against made on the host.

    python benchmarks/probe_device_desc.py [--t 512 2048 8192] [--calls 50]

Three questions, one table each (4096->4096, the routed layer's two base_mm forms: forward y = x W^T + u B_cat,
R = 128; backward dx = dy W + dhl [A_cat; Wr], dhl token-minor, R + E = 136; bf16; config CONFIGS[0]):
1. Correct: both kernels against float64, and against each other (the same tiles and K order: equal bits), at
   sizes no block divides as well (T = 7, 4097; 4096->11008).
2. GPU time: each kernel replayed in a CUDA graph (the device form captured with its scratch from the graph's
   pool), medians of interleaved rounds; cuBLAS's two GEMMs beside them.
3. Host time per call, the GPU held busy (profile_host.host_us): host descriptors, device descriptors, cuBLAS.
Then a MoLLinear fwd+bwd with the backward on autograd's worker thread (a thread where Triton's allocator was
never set) through the Triton kernel, against the host-descriptor run of the same inputs.
"""
import argparse
import os
import statistics
import sys

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol  # noqa: E402
from mol.kernels import base_gemm as bg  # noqa: E402
from profile_host import host_us  # noqa: E402


def operands(t: int, n_in: int, n_out: int, form: str, g: torch.Generator):
    """(a, b, b_t, u, v, v_t) as _routed_forward / _routed_backward pass them to base_mm (before plan's views)."""
    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(torch.bfloat16)
    if form == "forward":  # x (T, in), W (out, in), u (T, R), B_cat (R, out) as a transposed view
        return r(t, n_in), r(n_out, n_in, scale=0.02), True, r(t, 128), r(n_out, 128).t(), False
    # dy (T, out), W (out, in) untransposed, dhl token-minor (T, R+E), w_dx (R+E, in)
    dhl = r(136, -(-t // 8) * 8)[:, :t].t()
    return r(t, n_out), r(n_out, n_in, scale=0.02), False, dhl, r(136, n_in), False


def run(ops, device: bool, cfg=None):
    a, b, b_t, u, v, v_t = ops
    bg.DEVICE_DESCRIPTORS = device
    (kb, kb_t), (ku, ku_t), (kv, kv_t) = bg._row_major(b, b_t), bg._row_major(u, False), bg._row_major(v, v_t)
    return bg.triton_base_mm(a, kb, kb_t, ku, kv, kv_t, None, cfg or bg.CONFIGS[0], u_t=ku_t)


def reference(ops) -> torch.Tensor:
    a, b, b_t, u, v, v_t = ops
    return a.double() @ bg._op(b.double(), b_t) + u.double() @ bg._op(v.double(), v_t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {bg.triton.__version__}; "
          f"config {bg.CONFIGS[0]}")

    print("\n| T | in->out | form | host desc rel err | device desc rel err | equal bits |\n| --- | --- | --- | --- | --- | --- |")
    fails = 0
    for t, n_in, n_out in [(7, 4096, 4096), (4097, 4096, 11008), (8192, 4096, 4096), (2048, 11008, 4096)]:
        for form in ("forward", "backward"):
            ops = operands(t, n_in, n_out, form, g)
            ref = reference(ops)
            out = {}
            bg.gl.POISON = True  # outputs NaN-filled before the kernel: an element it does not write fails
            for device in (False, True):
                out[device] = run(ops, device)
            bg.gl.POISON = False
            errs = [((out[d].double() - ref).norm() / ref.norm()).item() for d in (False, True)]
            same = torch.equal(out[False], out[True])
            fails += not (max(errs) < 1e-2 and same and all(torch.isfinite(out[d]).all() for d in out))
            print(f"| {t} | {n_in}->{n_out} | {form} | {errs[0]:.2e} | {errs[1]:.2e} | {same} |")

    print("\n| T | form | host desc µs (GPU) | device desc µs (GPU) | cuBLAS two GEMMs µs | host desc µs (host) "
          "| device desc µs (host) | cuBLAS µs (host) |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in args.t:
        for form in ("forward", "backward"):
            ops = operands(t, 4096, 4096, form, g)
            a, b, b_t, u, v, v_t = ops
            fns = {"host": lambda: run(ops, False), "device": lambda: run(ops, True),
                   "cublas": lambda: bg._cublas(a, b, b_t, u, v, v_t, None)}
            gpu = {k: [] for k in fns}
            keep = bg._device_descriptors
            bg._device_descriptors = lambda x: bg.DEVICE_DESCRIPTORS  # capture the device form too
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    gpu[k].append(do_bench_cudagraph(fn, rep=50) * 1e3)
            bg._device_descriptors = keep
            host = {k: host_us(fn, args.calls) for k, fn in fns.items()}
            print(f"| {t} | {form} | " + " | ".join(f"{statistics.median(gpu[k]):.1f}" for k in fns) + " | "
                  + " | ".join(f"{host[k]:.1f}" for k in fns) + " |")

    # the layer through the kernel (not the idle-stream or small-T cuBLAS rules), backward on autograd's thread
    torch.manual_seed(0)
    n = 4096
    base = torch.nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32, backend="triton").to("cuda")
    with torch.no_grad():
        m.lora_B.normal_(0, 0.02)
    x = torch.randn(8192, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(8192, n, device="cuda", dtype=torch.bfloat16)
    # the Triton kernel alone (no cuBLAS or Gluon candidate), on every call whatever the host-time rules say
    bg.HOST_BOUND_CUBLAS, bg.EAGER_CUBLAS_ROWS, bg.BASE_GEMM, bg.GLUON = False, 0, "triton", False
    params = [x, m.lora_A, m.lora_B, m.router.weight]
    grads = {}
    torch.autograd.set_multithreading_enabled(True)
    for device in (False, True):
        bg.DEVICE_DESCRIPTORS = device
        y = m(x)
        grads[device] = [y.detach()] + list(torch.autograd.grad([y, m.aux_loss()], params,
                                                               [dy, torch.ones((), device="cuda")]))
        torch.cuda.synchronize()
    diff = [((p.double() - q.double()).norm() / q.double().norm()).item() for p, q in zip(grads[True], grads[False])]
    print("\nMoLLinear T=8192 fwd+bwd (worker-thread backward) through the Triton base GEMM, device against host "
          f"descriptors, relative difference (y, dx, dA, dB, dWr): {', '.join(f'{d:.1e}' for d in diff)}")
    fails += not max(diff) < 1e-3
    print(f"\n{'PASS' if not fails else f'FAIL ({fails})'}")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
