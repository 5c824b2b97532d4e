"""The Triton version gate on a GPU (mol.dispatch.MIN_TRITON).

    python benchmarks/gpu_check_versions.py

On CUDA: the version gate passes on this Triton with no warning; MoLLinear auto runs the kernels and matches the
reference backend; with a Triton faked older than MIN_TRITON, auto on CUDA warns and runs the reference."""
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import triton  # noqa: E402

import mol  # noqa: E402
from mol import dispatch  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("gpu_check_versions.py checks the version gate on a CUDA GPU and none is visible here")
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert dispatch.triton_available()
torch.manual_seed(0)
base = torch.nn.Linear(4096, 4096, bias=False).cuda().bfloat16().requires_grad_(False)
m = mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32).cuda()
with torch.no_grad():
    m.lora_B.normal_(0, 0.02)  # B = 0 would make the adapters' part vanish from the comparison
m.lora_A.data, m.lora_B.data = m.lora_A.data.bfloat16(), m.lora_B.data.bfloat16()  # the router stays float32
x = torch.randn(4097, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
assert dispatch.resolve_backend("auto", x) == "triton"
y = m(x); y.float().square().mean().backward(); gx = x.grad.clone(); x.grad = None
m.backend = "torch"
y2 = m(x); y2.float().square().mean().backward()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


print(f"auto(triton) vs torch: y {rel(y, y2):.2e} dx {rel(gx, x.grad):.2e}")
assert rel(y, y2) < 1e-2 and rel(gx, x.grad) < 1e-2
m.backend = "auto"
x.grad = None
triton.__version__ = "3.2.0"  # what torch 2.6 pins
dispatch._TRITON_OK = None
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    assert dispatch.resolve_backend("auto", x) == "torch"
    y3 = m(x)
print("old triton: auto ->", dispatch.resolve_backend("auto", x), "| warning:", w[0].message if w else None)
assert w and rel(y3, y2) < 1e-2
try:
    mol.MoLLinear(base, num_experts=8, top_k=2, rank=16, alpha=32, backend="triton").cuda().bfloat16()(x)
    raise SystemExit("forced triton did not raise")
except RuntimeError as e:
    print("forced:", str(e)[:160])
print("SANITY OK")
