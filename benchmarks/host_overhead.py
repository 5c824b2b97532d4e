"""Host (Python + ATen dispatch) cost of one MoLLinear on the fused Triton path, on any CPU, with the kernels stubbed.

    python benchmarks/host_overhead.py [--base cublas|triton] [--adapter-dtype base|float32] [--graph] [repo ...]

On the GPU machines an eager MoLLinear fwd+bwd costs ~0.8-1.5 ms of CPU (benchmarks/RESULTS.md runs 8-9), about
its GPU time at T=8192. This isolates the part that is ours: the Triton launches are replaced by allocations of
their outputs, du by the cuBLAS branch's torch.mm (as on CUDA), and everything else (MoLLinear.forward, dispatch,
the autograd.Function, the small torch ops and GEMMs on tiny CPU tensors) runs as it does on the GPU path. Times
are the best of 7 rounds of 1000 calls (MOL_HOST_OVERHEAD_CALLS), x of shape (2, 16, 64) as a model passes it
(T=32; before 2026-12-05's session 40 it was (32, 64)), 64->64, E=8 top-2 r=16. With several repo
paths (e.g. two checkouts) it alternates between them, a process per measurement, so machine noise hits both alike.
``--base triton`` measures the path of base_gemm.EAGER_CUBLAS=0's eager calls instead: bf16, the base GEMM (with
the experts' extra K) through base_gemm's Triton kernel, its launch stubbed (what remains is our glue: planning,
the TMA descriptors, the call), where the default (float32) takes base_mm's cuBLAS branch.
``--adapter-dtype float32`` gives that bf16 layer float32 adapters (MoLConfig.adapter_dtype="auto" on a bf16
model), cast to bf16 in the layer every call.
The last two columns are a decode step: one token, x of shape (1, 1, 64), no grad, through the routed layer's
one-launch small-T forward (its launch stubbed), beside a bare F.linear of the same token.
``--graph`` measures ``MoLLinear(graph_tokens=512)``'s calls (mol.kernels.layer_graphs): the capture is faked on the
CPU (a "graph" whose replay does nothing), so what remains is the host's side of a replayed call: the layer's glue,
the autograd node, the copies in and the clones out. After the first call every timed call takes the layer's
shortcut to its replay (LayerGraphs.replay_hit; checkouts before 81917f6 go the whole way each time). CUDA graph
launches themselves are not in it. The decode columns then measure ``graph_inference_tokens=1`` (where the
checkout has it): the no-grad call's copy in, (faked) replay and clone out.
"""
import inspect
import os
import subprocess
import sys
import time


def measure(repo: str, base: str = "cublas", adapter_dtype: str = "base", graph: bool = False) -> str:
    os.environ["TRITON_INTERPRET"] = "1"  # lets backend="triton" run on CPU tensors; no kernel runs (stubbed)
    sys.path.insert(0, repo)
    import torch

    import mol
    import mol.kernels.routed_lora as rl

    torch.set_num_threads(1)
    dt = torch.bfloat16 if base == "triton" else torch.float32
    if base == "triton":
        import mol.kernels.base_gemm as bg

        class _NoLaunch:  # the Triton launch itself (the JIT's argument binding, the driver call) is not ours
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None
        bg.BASE_GEMM = "triton"
        bg._base_gemm_kernel = _NoLaunch()

    def shrink(x, x_lora, a_cat, router_w):
        return (torch.empty(x.shape[0], a_cat.shape[0] + router_w.shape[0]), torch.empty(2 * router_w.shape[0] + 2),
                torch.empty(a_cat.shape[0] + router_w.shape[0], x.shape[1], dtype=x.dtype))

    def gate_fwd(hl, stats, noise, r_tot, rank, kind, top_k, scale, dtype, lb, z, *token_weights):
        t = hl.shape[0]
        return (torch.zeros(t, top_k), torch.zeros(t, top_k, dtype=torch.int64), torch.empty(t, r_tot, dtype=dtype),
                torch.zeros(()))

    def gate_bwd(du, hl, noise, gates, ids, stats, daux, rank, kind, scale, lb, z, dtype, *token_weights):
        return torch.empty(hl.shape, dtype=dtype)

    def du(dy, lora_B):  # the CUDA branch: cuBLAS on B_cat^T
        e, n_out, r = lora_B.shape
        return torch.mm(dy, lora_B.permute(1, 0, 2).reshape(n_out, e * r))

    rl._EAGER = (shrink, gate_fwd, gate_bwd, du) + tuple(rl._EAGER[4:])  # small-T, base GEMM (where present) as they are
    small_t_max, rl.SMALL_T_MAX = rl.SMALL_T_MAX, 0  # the large-T sequence (decode below restores it)
    if graph:
        import mol.kernels.layer_graphs as lg

        class _NoGraph:  # a captured graph whose replay launches nothing (on a GPU: one cudaGraphLaunch)
            def replay(self):
                pass
        lg._capturable = lambda x: True
        lg._warm_up = lambda step, device: step()
        lg._new_pool = lambda: None
        lg._capture = lambda step, pool: (_NoGraph(), step())
    n = 64
    base = torch.nn.Linear(n, n, bias=False, dtype=dt)
    graphs = {"graph_tokens": 512} if graph else {}
    if graph and "graph_inference_tokens" in inspect.signature(mol.MoLLinear).parameters:  # older checkouts: none
        graphs["graph_inference_tokens"] = 1
    m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32, backend="triton", adapter_dtype=adapter_dtype,
                      **graphs)
    x = torch.randn(2, 16, n, dtype=dt, requires_grad=True)
    dy = torch.randn(2, 16, n, dtype=dt)
    params = [m.lora_A, m.lora_B, m.router.weight]

    def train_step():
        y = m(x)
        ((y * dy).sum() + m.aux_loss()).backward()
        for p in params:
            p.grad = None

    def fwd():
        with torch.no_grad():
            m(x)

    def bare():
        torch.autograd.grad(torch.nn.functional.linear(x, base.weight), [x], dy)

    def best(fn, k=int(os.environ.get("MOL_HOST_OVERHEAD_CALLS", "1000")), rounds=7):
        for _ in range(100):
            fn()
        out = 1e9
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            out = min(out, (time.perf_counter() - t0) / k * 1e6)
        return out

    # decode: one token (1, 1, in), no grad, through the one-launch small-T forward (its launch stubbed)
    import mol.kernels.grouped_lora as gl
    x1 = torch.randn(1, 1, n, dtype=dt)
    launches = []
    gl._launch = lambda *args, **kwargs: launches.append(1)
    rl.SMALL_T_MAX = small_t_max

    def decode():  # generation runs in eval mode (and a no-grad call in training mode is never graphed)
        with torch.no_grad():
            m(x1)

    def bare_decode():
        with torch.no_grad():
            torch.nn.functional.linear(x1, base.weight)

    result = f"{best(bare):.1f} {best(train_step):.1f} {best(fwd):.1f} {best(bare_decode):.1f}"
    m.eval()
    result += f" {best(decode):.1f}"
    if not launches:
        raise SystemExit("decode: the small-T forward was not reached")
    if graph and len(m._graphs.captured) != 1:
        raise SystemExit(f"--graph: expected one captured signature, found {len(m._graphs.captured)}")
    if len(getattr(m._graphs, "inference", ())) != (1 if "graph_inference_tokens" in graphs else 0):
        raise SystemExit("--graph: the decode call was not captured (graph_inference_tokens=1)")
    return result


def main():
    if len(sys.argv) > 5 and sys.argv[1] == "--child":
        print(measure(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "graph"))
        return
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", choices=["cublas", "triton"], default="cublas")
    ap.add_argument("--adapter-dtype", choices=["base", "float32"], default="base")
    ap.add_argument("--graph", action="store_true", help="graph_tokens=512's replayed calls (replays faked)")
    ap.add_argument("repos", nargs="*", help="checkouts to compare (default: this one)")
    opts = ap.parse_args()
    base, adapter_dtype, graph = opts.base, opts.adapter_dtype, opts.graph
    repos = opts.repos or [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]
    for r in repos:  # the child imports mol from the checkout: elsewhere it would time whatever mol is installed
        if not os.path.isfile(os.path.join(r, "mol", "__init__.py")):
            ap.error(f"{r!r} is not a mol checkout (no mol/__init__.py in it)")
    runs = {r: [] for r in repos}
    for _ in range(5 if len(repos) > 1 else 1):
        for r in repos:
            out = subprocess.run([sys.executable, __file__, "--child", r, base, adapter_dtype,
                                  "graph" if graph else "eager"], capture_output=True, text=True, check=True)
            runs[r].append([float(v) for v in out.stdout.split()])
    print(f"base GEMM: {base} ({'bf16, Triton kernel, launch stubbed' if base == 'triton' else 'float32, cuBLAS branch'})"
          f"; adapters: {adapter_dtype}; {'graph_tokens=512, replays faked' if graph else 'eager kernels'}")
    print("| repo | bare nn.Linear fwd+bwd µs | MoLLinear fwd + .backward() µs | MoLLinear no-grad forward µs "
          "| decode, one token: bare F.linear µs | decode: MoLLinear µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r, vals in runs.items():
        med = [sorted(col)[len(col) // 2] for col in zip(*vals)]
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in med) + " |")


if __name__ == "__main__":
    main()
