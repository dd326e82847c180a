"""The tensor-core attention kernel alone, against PyTorch, on the GPU (part of scripts/gpu-check).

The end-to-end parity in gpu_check.py says whether logits agree; this says where the kernel is
wrong if they do not, and what the kernel costs next to the two ways PyTorch computes the same
thing. It loads the PTX that `scripts/build-cuda --pack` ships (.gpu/kernels.ptx) through CuPy
and launches `attention_{D}_{bf16,f16}` on PyTorch tensors, exactly as prefixd does:
q [B, H, S, D], k and v [B, H, P + S, D], an additive f32 key mask [B, P + S] (0 or -inf),
output merged-head rows [B·S, H·D].

  python3 scripts/gpu_attention_check.py .gpu/kernels.ptx     # prints one JSON object
"""

import json
import math
import sys

import cupy as cp
import numpy as np
import torch

QROWS = 16


def launch(fn, q, k, v, mask, scale):
    b, h, s, d = q.shape
    t = k.shape[2]
    out = torch.empty((b * s, h * d), dtype=q.dtype, device=q.device)
    warps = min(4, -(-s // QROWS))
    grid = (b * h, -(-s // (warps * QROWS)), 1)
    ptr = lambda x: np.uint64(x.data_ptr())
    fn(grid, (32 * warps, 1, 1), (ptr(q), ptr(k), ptr(v), ptr(mask), np.float32(scale), np.int32(h),
                                  np.int32(s), np.int32(t), ptr(out)))
    return out


def reference(q, k, v, mask, scale):
    """f32 softmax(q·Kᵀ·scale + mask)·V from the same rounded inputs, as merged-head rows."""
    b, h, s, d = q.shape
    x = q.float() @ k.float().transpose(-1, -2) * scale + mask[:, None, None, :]
    y = torch.softmax(x, dim=-1) @ v.float()
    return y.transpose(1, 2).reshape(b * s, h * d)


def inputs(b, h, s, p_max, d, dtype, gen):
    t = p_max + s
    q = torch.randn(b, h, s, d, generator=gen).to("cuda", dtype)
    k = torch.randn(b, h, t, d, generator=gen).to("cuda", dtype)
    v = torch.randn(b, h, t, d, generator=gen).to("cuda", dtype)
    mask = torch.zeros(b, t)
    for r in range(b):
        # Each row: a shorter prefix right-aligned in the p_max slots, and padding at the end.
        p = int(torch.randint(0, p_max + 1, (1,), generator=gen)) if p_max else 0
        real = int(torch.randint(1, s + 1, (1,), generator=gen))
        mask[r, : p_max - p] = -math.inf
        mask[r, p_max + real:] = -math.inf
    return q, k, v, mask.to("cuda")


def main():
    mod = cp.RawModule(path=sys.argv[1])
    gen = torch.Generator().manual_seed(0)
    report = {"cases": [], "timing_us": []}
    worst_ok = True
    # Shapes around every boundary the kernel has: 16-query warps, 64-query blocks, 64-key chunks.
    shapes = [(1, 1, 1, 0), (2, 3, 5, 8), (3, 12, 16, 20), (2, 12, 17, 20), (2, 4, 64, 0),
              (2, 12, 65, 20), (4, 12, 128, 20), (2, 12, 44, 20), (1, 2, 300, 30)]
    for dtype, suf in [(torch.bfloat16, "bf16"), (torch.float16, "f16")]:
        for d in (32, 64):
            fn = mod.get_function(f"attention_{d}_{suf}")
            for b, h, s, p in shapes:
                q, k, v, mask = inputs(b, h, s, p, d, dtype, gen)
                scale = 1 / math.sqrt(d)
                got = launch(fn, q, k, v, mask, scale).float()
                torch.cuda.synchronize()
                want = reference(q, k, v, mask, scale)
                # Rows past a row's last real token attend the same keys; all rows are compared.
                err = (got - want).abs().max().item()
                # bf16 keeps 8 bits: probabilities rounded once, outputs once.
                tol = 0.03 if suf == "bf16" else 0.006
                ok = bool(err <= tol and torch.isfinite(got).all())
                worst_ok &= ok
                report["cases"].append({"dtype": suf, "head_dim": d, "b": b, "h": h, "s": s,
                                        "p_max": p, "max_abs_err": err, "ok": ok})

    # Kernel time at the batch shapes of gpu-check, against PyTorch's batched matmuls + softmax and
    # its SDPA with the same mask.
    for b, s in [(32, 64), (128, 128), (512, 128)]:
        h, d, p = 12, 32, 20
        q, k, v, mask = inputs(b, h, s, p, d, torch.bfloat16, gen)
        fn = mod.get_function("attention_32_bf16")
        scale = 1 / math.sqrt(d)
        m4 = mask[:, None, None, :].to(torch.bfloat16)

        def eager():
            x = torch.softmax(q @ k.transpose(-1, -2) * scale + m4, dim=-1)
            return (x @ v).transpose(1, 2).reshape(b * s, h * d)

        def sdpa():
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m4, scale=scale)
            return y.transpose(1, 2).reshape(b * s, h * d)

        row = {"batch": b, "seq": s, "keys": p + s}
        for name, f in [("prefixd_kernel", lambda: launch(fn, q, k, v, mask, scale)),
                        ("torch_matmul_softmax", eager), ("torch_sdpa", sdpa)]:
            for _ in range(3):
                f()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n = 50
            start.record()
            for _ in range(n):
                f()
            end.record()
            torch.cuda.synchronize()
            row[name] = round(start.elapsed_time(end) * 1e3 / n, 1)
        report["timing_us"].append(row)
    report["all_ok"] = worst_ok
    print(json.dumps(report))


if __name__ == "__main__":
    main()
