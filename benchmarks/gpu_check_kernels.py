"""GPU correctness of mol's Triton grouped-LoRA kernels at real sizes against float64.

    python benchmarks/gpu_check_kernels.py            # all cases, one fixed tile config
    MOL_TRITON_AUTOTUNE=1 python benchmarks/gpu_check_kernels.py --quick   # autotuned tiles

Forward and every gradient (base_out, x, lora_A, lora_B, gates; plus the fused-base variant)
vs a float64 per-(expert, k) loop on the GPU; outputs poisoned with NaN so an unwritten
element fails. Pass: bf16 relative error < 1e-2, float32 < 1e-4. Exit code 1 on any failure.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("MOL_TRITON_AUTOTUNE", "0")  # compile one config per shape class: minutes -> seconds
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mol.kernels.grouped_lora as gl  # noqa: E402


def reference(base, x, A, B, gates, ids, scale):
    """float64, independent of the kernels: a loop over (k, expert) with boolean masks."""
    y = base.clone()
    E = A.shape[0]
    for k in range(ids.shape[1]):
        for e in range(E):
            m = ids[:, k] == e
            if m.any():
                xm = x[m]
                y = y.index_add(0, m.nonzero()[:, 0],
                                scale * gates[m, k, None] * ((xm @ A[e].t()) @ B[e].t()))
    return y


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(T, n_in, n_out, E, r, K, dtype, mode, fused, gen):
    dev = "cuda"
    x = torch.randn(T, n_in, device=dev, generator=gen).to(dtype)
    base = torch.randn(T, n_out, device=dev, generator=gen).to(dtype)
    A = (torch.randn(E, r, n_in, device=dev, generator=gen) / n_in**0.5).to(dtype)
    B = (torch.randn(E, n_out, r, device=dev, generator=gen) / r**0.5).to(dtype)
    W = (torch.randn(n_out, n_in, device=dev, generator=gen) / n_in**0.5).to(dtype)
    gates = torch.rand(T, K, device=dev, generator=gen)
    if mode == "one_expert":
        ids = torch.full((T, K), E - 1, device=dev, dtype=torch.long)
    else:  # distinct per token; expert 0 gets no tokens when E > K
        lo = 1 if E > K else 0
        ids = torch.rand(T, E - lo, device=dev, generator=gen).argsort(1)[:, :K] + lo
    dy = torch.randn(T, n_out, device=dev, generator=gen).to(dtype)
    scale = 2.0
    names = ["x", "lora_A", "lora_B", "gates"] + ([] if fused else ["base_out"])
    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, A, B, gates)]
    if fused:
        y = gl.grouped_lora_linear(leaves[0], W, None, *leaves[1:], ids, scale)
        base_ref = ref_leaves[0] @ W.double().t()
    else:
        leaves.append(base.clone().requires_grad_())
        ref_leaves.append(base.double().requires_grad_())
        y = gl.grouped_lora_add(leaves[4], *leaves[:4], ids, scale)
        base_ref = ref_leaves[4]
    y.backward(dy)
    y_ref = reference(base_ref, *ref_leaves[:4], ids, scale)
    y_ref.backward(dy.double())
    errs = {"y": rel(y, y_ref) if torch.isfinite(y).all() else float("nan")}
    for n, a, b in zip(names, leaves, ref_leaves):
        errs["d" + n] = rel(a.grad, b.grad) if torch.isfinite(a.grad).all() else float("nan")
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few cases only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check_kernels.py needs a CUDA GPU and none is visible here")
    gl.POISON = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for T in (1, 7, 4097):
            for n_in, n_out in ((4095, 11008), (11008, 4095)):
                for E, K in ((1, 1), (2, 2), (8, 2), (8, 4), (64, 4)):
                    cases.append((T, n_in, n_out, E, 16, K, dtype, "random", False))
        cases.append((4097, 4095, 11008, 8, 16, 2, dtype, "one_expert", False))
        cases.append((4097, 4095, 11008, 2, 16, 1, dtype, "one_expert", False))
        for T in (7, 4097):
            cases.append((T, 4095, 11008, 8, 16, 2, dtype, "random", True))
            cases.append((T, 11008, 4095, 64, 8, 4, dtype, "random", True))
    if args.quick:
        cases = [c for c in cases if c[0] != 7 and c[3] in (8, 64)][:8]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"autotune={os.environ['MOL_TRITON_AUTOTUNE']}")
    print(f"{'T':>5} {'in':>6} {'out':>6} {'E':>3} {'r':>3} {'K':>2} {'dtype':>9} {'mode':>10} {'op':>6} "
          f"{'max rel err':>12} {'worst':>8} {'ok':>3}")
    n_fail = 0
    t0 = time.time()
    for T, n_in, n_out, E, r, K, dtype, mode, fused in cases:
        errs = check(T, n_in, n_out, E, r, K, dtype, mode, fused, gen)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
        worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
        ok = all(v < tol for v in errs.values())  # NaN compares False: fails
        n_fail += not ok
        print(f"{T:>5} {n_in:>6} {n_out:>6} {E:>3} {r:>3} {K:>2} {str(dtype)[6:]:>9} {mode:>10} "
              f"{'fused' if fused else 'add':>6} {errs[worst]:>12.2e} {worst:>8} {'yes' if ok else 'NO':>3}")
    torch.cuda.synchronize()
    print(f"{len(cases)} cases, {n_fail} failed, {time.time() - t0:.0f} s")
    n_fail += check_layer_no_sync_and_graph()
    sys.exit(1 if n_fail else 0)


def check_layer_no_sync_and_graph() -> int:
    """MoLLinear forward+backward on CUDA with sync debug mode 'error' (any host sync raises), then the
    forward captured in a CUDA graph and replayed on new inputs, compared with eager. Returns failures."""
    import mol

    failures = 0
    for backend in ("triton", "torch"):
        for router, k in (("topk", 2), ("switch", 1), ("soft", 8), ("sequence", 2)):
            layer = mol.MoLLinear(torch.nn.Linear(1024, 768), num_experts=8, top_k=k, rank=16, router=router,
                                  backend=backend).cuda().to(torch.bfloat16)
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.02)
            x = torch.randn(4, 257, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2):  # warm-up: autotuning benchmarks (and syncs) once per shape
                (layer(x).float().square().mean() + layer.aux_loss()).backward()
            torch.cuda.synchronize()
            try:
                torch.cuda.set_sync_debug_mode("error")
                (layer(x).float().square().mean() + layer.aux_loss()).backward()
                ok_sync = True
            except RuntimeError as e:
                ok_sync, err = False, str(e).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            static_x = torch.randn(4, 257, 1024, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                layer(static_x)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    layer(static_x)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_y = layer(static_x)
                static_x.copy_(torch.randn_like(static_x))
                graph.replay()
                eager = layer(static_x)
            graph_err = ((static_y.float() - eager.float()).norm() / eager.float().norm()).item()
            ok = ok_sync and graph_err < 1e-2
            failures += not ok
            print(f"layer {backend:>6} {router:>8}: no host sync {'yes' if ok_sync else 'NO (' + err + ')'}, "
                  f"CUDA graph replay rel err {graph_err:.1e} {'ok' if ok else 'FAIL'}")
    return failures


if __name__ == "__main__":
    main()
