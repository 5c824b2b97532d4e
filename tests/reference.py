"""Independent float64 formulas the kernels are checked against, and lora_B memory-layout helpers (importable
without side effects, also by the benchmarks/gpu_check_*.py scripts)."""
import torch


def routed_layer_float64(x, x_lora, W, bias, base_out, A, B, Wr, noise, kind, K, scale, lb, zc, real=None):
    """float64: softmax router, top-k selection, per-(token, k) expert products, Switch load balance, z-loss.
    ``real`` (T,) bool: the tokens the losses count (the others are padding); None: all."""
    logits = x @ Wr.t()
    if noise is not None:
        logits = logits + noise
    probs = logits.softmax(-1)
    E = Wr.shape[0]
    if kind == "soft":
        gates, ids = probs, torch.arange(E, device=x.device).expand_as(probs)
    else:
        top, ids = probs.topk(K, -1)
        gates = top / top.sum(-1, keepdim=True) if kind == "topk" else top
    h = torch.einsum("tkri,ti->tkr", A[ids], x_lora)
    d = torch.einsum("tkor,tkr->tko", B[ids], h)
    base = x @ W.t() + (bias if bias is not None else 0) if W is not None else base_out
    y = base + scale * (gates[..., None] * d).sum(1)
    if real is not None:  # the losses of the real tokens alone, as if the padding were not in the batch
        ids_l, probs, logits = ids[real], probs[real], logits[real]
    else:
        ids_l = ids
    if ids_l.numel() == 0:
        return y, (probs.sum() + logits.sum()) * 0.0, ids
    counts = torch.zeros(E, dtype=x.dtype, device=x.device).scatter_add(0, ids_l.reshape(-1), torch.ones(ids_l.numel(), dtype=x.dtype, device=x.device))
    lb_loss = E * (counts / counts.sum() * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, -1).square().mean()
    return y, lb * lb_loss + zc * z_loss, ids


def interleaved(B):
    """B (E, out, r) stored in (out, E, r) memory order, as MoLLinear stores its lora_B."""
    return B.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def same_layout(a, b) -> bool:
    """a and b are laid out alike in memory: equal strides wherever a dimension has more than one element."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)
