"""The tensor-core attention kernel alone, against PyTorch, on the GPU (part of scripts/gpu-check).

The end-to-end parity in gpu_check.py says whether logits agree; this says where the kernel is
wrong if they do not, and what the kernel costs next to the two ways PyTorch computes the same
thing. It loads the PTX that `scripts/build-cuda --pack` ships (.gpu/kernels.ptx) through CuPy
and launches `attention_{D}_{bf16,f16}` on PyTorch tensors, exactly as prefixd does: the QKV
matmul's output [B·S, 3·H·D] and its bias, each row's task prefix [L, 2, H, P_b, D] through a
table of device pointers, an additive f32 key mask [B, Pmax + S] (0 or -inf); output merged-head
rows [B·S, H·D].

  python3 scripts/gpu_attention_check.py .gpu/kernels.ptx     # prints one JSON object
"""

import json
import math
import sys

import cupy as cp
import numpy as np
import torch

QROWS = 16


class Case:
    """One batch: rows of tokens, each row's task prefix (tasks of different P), the mask."""

    def __init__(self, b, h, s, p_max, d, dtype, gen, layers=2, layer=1):
        self.b, self.h, self.s, self.p_max, self.d, self.layer = b, h, s, p_max, d, layer
        hd = h * d
        self.qkv = torch.randn(b * s, 3 * hd, generator=gen).to("cuda", dtype)
        self.bias = (torch.randn(3 * hd, generator=gen) * 0.5).to("cuda", dtype)
        # Three tasks: the longest prefix, a shorter one, and none at all (P = 0) when p_max > 0.
        ps = [p_max, p_max // 2, 0] if p_max else [0]
        self.tasks = [torch.randn(layers, 2, h, p, d, generator=gen).to("cuda", dtype) for p in ps]
        self.row_task = [r % len(ps) for r in range(b)]
        self.row_p = torch.tensor([ps[t] for t in self.row_task], dtype=torch.int32, device="cuda")
        self.row_ptr = torch.tensor([self.tasks[t].data_ptr() for t in self.row_task],
                                    dtype=torch.int64, device="cuda")
        mask = torch.zeros(b, p_max + s)
        for r in range(b):
            p = ps[self.row_task[r]]
            real = int(torch.randint(1, s + 1, (1,), generator=gen))
            mask[r, : p_max - p] = -math.inf
            mask[r, p_max + real:] = -math.inf
        self.mask = mask.to("cuda")
        self.scale = 1 / math.sqrt(d)

    def launch(self, fn, warps=4):
        b, h, s, d = self.b, self.h, self.s, self.d
        out = torch.empty((b * s, h * d), dtype=self.qkv.dtype, device="cuda")
        warps = min(warps, -(-s // QROWS))
        grid = (b * h, -(-s // (warps * QROWS)), 1)
        ptr = lambda x: np.uint64(x.data_ptr())
        fn(grid, (32 * warps, 1, 1),
           (ptr(self.qkv), ptr(self.bias), ptr(self.row_ptr), ptr(self.row_p), np.int32(self.layer),
            ptr(self.mask), np.float32(self.scale), np.int32(h), np.int32(s), np.int32(self.p_max),
            ptr(out)))
        return out

    def qkv_heads(self):
        """q [B, H, S, D] and k, v [B, H, Pmax + S, D] as the kernel sees them (bias added and
        rounded to the storage type once, prefixes right-aligned, zeros left of a short one)."""
        b, h, s, d, pm = self.b, self.h, self.s, self.d, self.p_max
        x = (self.qkv.float() + self.bias.float()).to(self.qkv.dtype)
        x = x.reshape(b, s, 3, h, d).permute(2, 0, 3, 1, 4)  # [3, B, H, S, D]
        k = torch.zeros(b, h, pm + s, d, dtype=x.dtype, device="cuda")
        v = torch.zeros_like(k)
        k[:, :, pm:], v[:, :, pm:] = x[1], x[2]
        for r in range(b):
            t = self.tasks[self.row_task[r]]
            p = t.shape[3]
            if p:
                k[r, :, pm - p:pm] = t[self.layer, 0]
                v[r, :, pm - p:pm] = t[self.layer, 1]
        return x[0].contiguous(), k, v

    def reference(self):
        """f32 softmax(q·Kᵀ·scale + mask)·V as merged-head rows."""
        q, k, v = self.qkv_heads()
        x = q.float() @ k.float().transpose(-1, -2) * self.scale + self.mask[:, None, None, :]
        y = torch.softmax(x, dim=-1) @ v.float()
        return y.transpose(1, 2).reshape(self.b * self.s, self.h * self.d)


def main():
    mod = cp.RawModule(path=sys.argv[1])
    gen = torch.Generator().manual_seed(0)
    report = {"cases": [], "timing_us": []}
    all_ok = True
    # Shapes around every boundary the kernel has: 16-query warps, 128-query blocks, 64-key
    # chunks, the prefix/token seam inside a chunk, no prefix at all.
    shapes = [(1, 1, 1, 0), (2, 3, 5, 8), (3, 12, 16, 20), (2, 12, 17, 20), (2, 4, 64, 0),
              (3, 12, 65, 20), (4, 12, 128, 20), (3, 12, 44, 20), (2, 2, 300, 30), (3, 4, 129, 64)]
    for dtype, suf in [(torch.bfloat16, "bf16"), (torch.float16, "f16")]:
        for d in (32, 64):
            fn = mod.get_function(f"attention_{d}_{suf}")
            for b, h, s, p in shapes:
                c = Case(b, h, s, p, d, dtype, gen)
                want = c.reference()
                for warps in (8, 4, 1):
                    got = c.launch(fn, warps).float()
                    torch.cuda.synchronize()
                    err = (got - want).abs().max().item()
                    # bf16 keeps 8 bits: probabilities rounded once, outputs once.
                    tol = 0.03 if suf == "bf16" else 0.006
                    ok = bool(err <= tol and torch.isfinite(got).all())
                    all_ok &= ok
                    report["cases"].append({"dtype": suf, "head_dim": d, "b": b, "h": h, "s": s,
                                            "p_max": p, "warps": warps, "max_abs_err": err, "ok": ok})

    # Kernel time at the batch shapes of gpu-check (4, the default, and 8 warps a block), against PyTorch's
    # batched matmuls + softmax and its SDPA with the same mask, from the same q, k, v.
    for b, s in [(32, 64), (128, 128), (512, 128)]:
        h, d, p = 12, 32, 20
        c = Case(b, h, s, p, d, torch.bfloat16, gen)
        q, k, v = c.qkv_heads()
        fn = mod.get_function("attention_32_bf16")
        m4 = c.mask[:, None, None, :].to(torch.bfloat16)

        def eager():
            x = torch.softmax(q @ k.transpose(-1, -2) * c.scale + m4, dim=-1)
            return (x @ v).transpose(1, 2).reshape(b * s, h * d)

        def sdpa():
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m4, scale=c.scale)
            return y.transpose(1, 2).reshape(b * s, h * d)

        row = {"batch": b, "seq": s, "keys": p + s}
        for name, f in [("prefixd_kernel_8_warps", lambda: c.launch(fn, 8)),
                        ("prefixd_kernel_4_warps", lambda: c.launch(fn, 4)),
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
    report["all_ok"] = all_ok
    # Only the failures in full; the passing cases as a count.
    report["failed_cases"] = [c for c in report["cases"] if not c["ok"]]
    report["cases"] = {"total": len(report["cases"]), "ok": sum(c["ok"] for c in report["cases"]),
                       "worst_bf16": max(c["max_abs_err"] for c in report["cases"] if c["dtype"] == "bf16"),
                       "worst_f16": max(c["max_abs_err"] for c in report["cases"] if c["dtype"] == "f16")}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
