"""Does the NF4 decode kernels' access pattern cap the read bandwidth? CUDA-graph replay medians on a CUDA GPU.

    python benchmarks/probe_nf4_read_pattern.py

The decode kernels read a row block's codes a few dozen bytes per row at a time (mol/kernels/nf4_mma.py: a warp
reads 16 rows x 32-64 bytes per step). This reads the 4096x4096 NF4 codes (8 MiB of int32 words) with programs of
BM rows and a K share (split), in steps of W bytes per row, and prints the time of each shape: if the narrow steps
read as fast as the wide ones, the access pattern is not what holds a decode kernel back.
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def _read(a_ptr, out_ptr, ROW_WORDS: tl.constexpr, BM: tl.constexpr, WW: tl.constexpr, SHARE: tl.constexpr,
          SPLIT: tl.constexpr):
    """xor of rows [pid * BM, +BM), words [split * SHARE, +SHARE), WW words per row per step."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ptrs = a_ptr + rows[:, None] * ROW_WORDS + tl.program_id(1) * SHARE + tl.arange(0, WW)[None, :]
    acc = tl.zeros((BM, WW), tl.int32)
    for i in range(SHARE // WW):
        acc ^= tl.load(ptrs + i * WW)
    tl.store(out_ptr + tl.program_id(0) * SPLIT + tl.program_id(1), tl.xor_sum(tl.xor_sum(acc, 1), 0))


def main():
    n, k = 4096, 4096
    row_words = k // 8  # two 4-bit codes a byte
    a = torch.randint(0, 2**31 - 1, (n, row_words), dtype=torch.int32, device="cuda")
    out = torch.empty(n * 64, dtype=torch.int32, device="cuda")
    print(torch.cuda.get_device_name())
    print("| BM rows | bytes per row per step | split | warps | us | TB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for bm in (16, 64):
        for wb in (32, 64, 128, 256, 512):
            for split in (1, 4):
                for nw in (1, 4):
                    if bm * wb // 4 < 32 * nw:
                        continue

                    def f():
                        _read[(n // bm, split)](a, out, row_words, bm, wb // 4, row_words // split, split,
                                                num_warps=nw)
                    f()
                    t = do_bench_cudagraph(f, rep=50)
                    print(f"| {bm} | {wb} | {split} | {nw} | {t * 1e3:.2f} | {a.numel() * 4 / t / 1e9:.2f} |")


if __name__ == "__main__":
    main()
