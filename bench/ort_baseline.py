#!/usr/bin/env python3
"""ONNX Runtime yardstick for `prefixd bench`, shaped like ../shared/bench/torch_baseline.py.

Two ONNX models of the same checkpoint:
  --variant prefix  the prefixed model PEFT computes (its prefix keys/values concatenated in every
                    layer, positions from P), written here as plain PyTorch ops and exported with
                    the adapter's prefix baked in. Checked first against PEFT's own logits on the
                    adapter's fixture cases (must agree to 1e-4), so it is the same model.
  --variant plain   transformers' BertForSequenceClassification without a prefix: the lower bound
                    on ORT's work (ORT's transformer fusions recognise its attention pattern).
ORT: graph optimizations ALL, intra-op threads = --threads, sequential execution.

    python bench/ort_baseline.py --model models/all-minilm-l6-v2 --adapter ../shared/fixtures/peft/multi4-p20 \\
        --variant prefix --batch 32 --seq-len 64
    ... --latency
Exported models are cached under --cache (default /tmp/prefixd-ort).
"""
import argparse
import json
import math
import os
import statistics
import time

SENTENCE = "This movie was surprisingly good, I would watch it again!"


def prefixed_module(model_dir, adapter_dir):
    """The prefixed BERT classifier as plain tensor ops (exportable), and its label count."""
    import torch
    from safetensors.torch import load_file
    from transformers import BertModel

    bert = BertModel.from_pretrained(model_dir).eval()
    ad = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    cfg = bert.config
    L, H, Hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    D = Hd // H
    prompt = ad["prompt_embeddings"].float()  # [P, L*2*Hd]
    P = prompt.shape[0]
    # [P, L, 2, H, D] -> [L, 2, H, P, D]
    kv = prompt.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4).contiguous()
    cls_w, cls_b = ad["base_model.classifier.weight"].float(), ad["base_model.classifier.bias"].float()

    class Prefixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert
            self.register_buffer("kv", kv)
            self.classifier = torch.nn.Linear(Hd, cls_w.shape[0])
            self.classifier.weight.data.copy_(cls_w)
            self.classifier.bias.data.copy_(cls_b)

        def forward(self, input_ids, attention_mask, token_type_ids):
            B, S = input_ids.shape
            e = self.bert.embeddings
            pos = torch.arange(S, device=input_ids.device).unsqueeze(0) + P
            x = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids)
            x = e.LayerNorm(x + e.position_embeddings(pos))
            keep = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype), attention_mask], dim=1)
            mask = (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min
            for l, layer in enumerate(self.bert.encoder.layer):
                a = layer.attention.self
                q = a.query(x).view(B, S, H, D).transpose(1, 2)
                k = a.key(x).view(B, S, H, D).transpose(1, 2)
                v = a.value(x).view(B, S, H, D).transpose(1, 2)
                k = torch.cat([self.kv[l, 0].unsqueeze(0).expand(B, H, P, D), k], dim=2)
                v = torch.cat([self.kv[l, 1].unsqueeze(0).expand(B, H, P, D), v], dim=2)
                s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + mask
                ctx = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(B, S, Hd)
                o = layer.attention.output
                x = o.LayerNorm(o.dense(ctx) + x)
                h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
                x = layer.output.LayerNorm(layer.output.dense(h) + x)
            pooled = torch.tanh(self.bert.pooler.dense(x[:, 0]))
            return self.classifier(pooled)

    return Prefixed().eval(), cls_w.shape[0]


def check_against_peft(module, adapter_dir, model_dir):
    """The export's source must compute PEFT's logits: the adapter's fixture cases, to 1e-4."""
    import torch
    path = os.path.join(adapter_dir, "cases.jsonl")
    worst = 0.0
    with open(path) as f:
        for line in f:
            c = json.loads(line)
            ids = torch.tensor([c["input_ids"]])
            with torch.inference_mode():
                got = module(ids, torch.ones_like(ids), torch.tensor([c["token_type_ids"]]))[0]
            worst = max(worst, max(abs(a - b) for a, b in zip(got.tolist(), c["logits"])))
    if worst > 1e-4:
        raise SystemExit(f"the prefixed export source differs from PEFT by {worst}")
    return worst


def export(args):
    import torch
    os.makedirs(args.cache, exist_ok=True)
    tag = os.path.basename(os.path.normpath(args.adapter)) if args.variant == "prefix" else "plain"
    path = os.path.join(args.cache, f"{tag}.onnx")
    meta = {}
    if os.path.exists(path):
        return path, meta
    if args.variant == "prefix":
        module, _ = prefixed_module(args.model, args.adapter)
        meta["max_abs_logit_diff_vs_peft"] = check_against_peft(module, args.adapter, args.model)
    else:
        from transformers import BertForSequenceClassification
        module = BertForSequenceClassification.from_pretrained(args.model, num_labels=2).eval()
        module.config.return_dict = False
    ids = torch.randint(1000, 30000, (2, 16))
    torch.onnx.export(
        module, (ids, torch.ones_like(ids), torch.zeros_like(ids)), path,
        input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
        dynamic_axes={n: {0: "batch", 1: "seq"} for n in ["input_ids", "attention_mask", "token_type_ids"]},
        opset_version=17, dynamo=False)
    return path, meta


def timed(fn, warmup, min_calls, min_seconds):
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cpu_isa_seen():
    """What CPUID tells this process (MLAS picks its kernels from the same bits): NumPy's probe."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as f
    except ImportError:
        return "unknown"
    return "avx512" if f.get("AVX512F") else "avx2" if f.get("AVX2") and f.get("FMA3") else "older"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", help="PEFT prefix adapter (for --variant prefix)")
    ap.add_argument("--variant", choices=["prefix", "plain"], default="prefix")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--cache", default="/tmp/prefixd-ort")
    args = ap.parse_args()
    if args.variant == "prefix" and not args.adapter:
        ap.error("--variant prefix needs --adapter")
    import numpy as np
    import onnxruntime as ort

    path, meta = export(args)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    settings = {"engine": f"onnxruntime-{args.variant}", "threads": args.threads, "onnxruntime": ort.__version__,
                "cpu_isa_seen": cpu_isa_seen(), **meta}
    if args.variant == "prefix":
        # The exported graph itself, run by ORT, against PEFT's logits.
        worst = 0.0
        with open(os.path.join(args.adapter, "cases.jsonl")) as f:
            for line in f:
                c = json.loads(line)
                ids = np.array([c["input_ids"]], dtype=np.int64)
                out = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                      "token_type_ids": np.array([c["token_type_ids"]], dtype=np.int64)})[0][0]
                worst = max(worst, float(np.abs(out - np.array(c["logits"])).max()))
        settings["ort_max_abs_logit_diff_vs_peft"] = worst

    if args.latency:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_length=128)

        def request():
            enc = tok.encode(SENTENCE)
            ids = np.array([enc.ids], dtype=np.int64)
            out = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                  "token_type_ids": np.array([enc.type_ids], dtype=np.int64)})
            return int(out[0].argmax(-1)[0])

        ms = sorted(t * 1000 for t in timed(request, 20, 200, args.seconds))
        print(json.dumps({**settings, "mode": "latency", "tokens": len(tok.encode(SENTENCE).ids),
                          "median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * len(ms)) - 1],
                          "calls": len(ms)}))
        return
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30522, size=(args.batch, args.seq_len), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    times = timed(lambda: sess.run(None, feeds), 3, 7, args.seconds)
    med = statistics.median(times)
    print(json.dumps({**settings, "mode": "throughput", "batch": args.batch, "seq_len": args.seq_len,
                      "median_batch_ms": med * 1000, "seq_per_s": args.batch / med, "calls": len(times)}))


if __name__ == "__main__":
    main()
