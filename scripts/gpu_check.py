#!/usr/bin/env python3
"""One-shot GPU check of prefixd against PyTorch + PEFT on the same GPU (see scripts/gpu-check).

Runs on a GPU machine with no network and no Rust: the prefixd binary arrives prebuilt in
.gpu/prefixd.xz (scripts/build-cuda --pack), with the default model's config.json and
tokenizer.json in .gpu/model/. The real weights do not travel, so a MiniLM-shaped BERT with random
weights is made here with PyTorch; PEFT prefix adapters are made on it too, and PEFT's own logits
on this GPU are the parity reference. Everything else is timing, both engines in this one run.

    python3 scripts/gpu_check.py OUT_DIR [--device cuda|cpu] [--quick] [--focus | --train-only]

--device cpu runs the same steps on the CPU with tiny shapes: the dry run that checks this script
on a machine without a GPU. Prints one JSON report (also written to OUT_DIR/gpu-check.json) and a
short table. A failing step is recorded under "errors" and the rest still runs. --focus runs only
what concerns half precision and training (the attention kernel alone, parity, half-precision
throughput, training speed and its kernel profile): a shorter run while working on those;
--train-only runs the same-seed trainings alone.
"""
import argparse
import json
import lzma
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = "/tmp/prefixd-gpu-check"
SENTENCE = "This movie was surprisingly good, I would watch it again!"
# (name, P, labels, pair task?)
TASKS = [("sst2like-p8", 8, 2, False), ("multi4-p20", 20, 4, False), ("pair-p10", 10, 3, True)]
WORDS = (
    "the a film movie story plot actor scene music great terrible boring wonderful slow fast "
    "question answer when where who why how city river country market price stock team game "
    "player won lost season election court law science space rocket data model network energy "
    "money bank loan free call now text reply stop win prize cash offer urgent meeting tomorrow "
    "today yesterday happy sad angry calm bright dark long short small large old new good bad "
    "man woman child dog cat car house road train plane ship book page word letter number"
).split()

report = {"errors": [], "timings_s": {}}


def step(name):
    """Runs a step, recording its wall time and any failure; returns the step's result or None."""
    def wrap(fn):
        t0 = time.time()
        try:
            return fn()
        except Exception as e:  # a failed step must not lose the others' results
            report["errors"].append({"step": name, "error": f"{type(e).__name__}: {e}",
                                     "trace": traceback.format_exc()[-2000:]})
            print(f"[gpu-check] step {name} FAILED: {e}", flush=True)
            return None
        finally:
            report["timings_s"][name] = round(time.time() - t0, 2)
    return wrap


def sh(args, env, timeout=180, stdin=None):
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:3]))} … exited {p.returncode}: {p.stderr[-1500:]}")
    return p.stdout


def library_dirs():
    """Folders holding the CUDA libraries the binary links (cuBLAS, cuRAND, NVRTC, cudart)."""
    want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"]
    roots = [sys.prefix, "/usr/local/cuda", "/usr/local/nvidia", "/usr/lib/x86_64-linux-gnu"]
    try:
        import site
        roots += site.getsitepackages()
    except Exception:
        pass
    found = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for w in want:
                if w in files and w not in found:
                    found[w] = dirpath
            if len(found) == len(want):
                break
    missing = [w for w in want if w not in found]
    return sorted(set(found.values())), missing


def sentences(rng, n, pair):
    out = []
    for i in range(n):
        length = [1, 3, 8, 14, 25, 40, 70, 140][i % 8]  # 140 words: truncated at 128 tokens
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        if i == 0:
            text = ""  # encodes to [CLS] [SEP] and must still classify
        item = {"text": text}
        if pair:
            item["text_pair"] = " ".join(rng.choice(WORDS) for _ in range(3 + i % 11))
        out.append(item)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and short timings")
    ap.add_argument("--focus", action="store_true", help="half precision and training only")
    ap.add_argument("--train-only", action="store_true", help="only the same-seed training runs")
    args = ap.parse_args()
    quick = args.quick or args.device == "cpu"
    focus = args.focus
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    t_start = time.time()
    secs = 0.5 if quick else 2.0

    import torch
    from tokenizers import Tokenizer

    dev = args.device
    report["torch"] = torch.__version__
    report["device"] = dev
    if dev == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
        report["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        try:
            report["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:
            report["nvidia_smi"] = str(e)
    import transformers
    import peft
    report["transformers"], report["peft"] = transformers.__version__, peft.__version__

    # The binary and the libraries it links.
    binary = os.environ.get("PREFIXD_BIN") or os.path.join(WORK, "prefixd")
    if not os.environ.get("PREFIXD_BIN"):
        with lzma.open(os.path.join(REPO, ".gpu/prefixd.xz")) as src, open(binary, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(binary, 0o755)
    env = dict(os.environ, RUST_LOG="warn", RUST_BACKTRACE="0")
    if dev == "cuda":
        dirs, missing = library_dirs()
        report["library_dirs"], report["libraries_missing"] = dirs, missing
        env["LD_LIBRARY_PATH"] = ":".join(dirs + [env.get("LD_LIBRARY_PATH", "")])
    pdev = ["--device", "cuda" if dev == "cuda" else "cpu"]

    # A MiniLM-shaped BERT with random weights (the real one does not travel), and the tokenizer.
    model_dir = os.path.join(WORK, "model")
    torch.manual_seed(0)
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    @step("make_model")
    def _():
        cfg = BertConfig.from_json_file(os.path.join(REPO, ".gpu/model/config.json"))
        BertModel(cfg).save_pretrained(model_dir, safe_serialization=True)
        shutil.copy(os.path.join(REPO, ".gpu/model/tokenizer.json"), model_dir)
    if args.train_only:
        devices = ["cuda", "cpu"] if dev == "cuda" else ["cpu"]
        report["training_same_seed"] = same_seed_training(binary, model_dir, env, devices, quick)
        with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report, indent=1))
        return
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=128)

    from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model

    def make_adapter(name, p, labels, seed):
        torch.manual_seed(seed)
        m = BertForSequenceClassification.from_pretrained(model_dir, num_labels=labels)
        with torch.no_grad():  # a random head big enough that logits are not all near zero
            m.classifier.weight.mul_(25.0)
            m.classifier.bias.normal_(0.0, 0.1)
        pm = get_peft_model(m, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=p))
        d = os.path.join(WORK, name)
        pm.save_pretrained(d)
        return d

    def load_peft(adapter, labels, dtype=torch.float32):
        base = BertForSequenceClassification.from_pretrained(
            model_dir, num_labels=labels, attn_implementation="sdpa")
        return PeftModel.from_pretrained(base, adapter).to(dev, dtype=dtype).eval()

    # Parity: PEFT's logits on this device vs prefixd's, all tasks interleaved in mixed batches.
    cases_path = os.path.join(WORK, "mixed.jsonl")
    adapters = {}

    @step("peft_reference")
    def ref():
        rng = random.Random(7)
        lines = []
        for i, (name, p, labels, pair) in enumerate(TASKS):
            adapters[name] = make_adapter(name, p, labels, 100 + i)
            model = load_peft(adapters[name], labels)
            for j, item in enumerate(sentences(rng, 8 if quick else 24, pair)):
                enc = tok.encode(item["text"], item.get("text_pair")) if pair else tok.encode(item["text"])
                ids = torch.tensor([enc.ids], device=dev)
                with torch.inference_mode():
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   token_type_ids=torch.tensor([enc.type_ids], device=dev)).logits[0]
                lines.append((j, i, {**item, "task": name, "logits": logits.float().cpu().tolist()}))
        adapters["bench"] = make_adapter("bench-p20", 20, 2, 999)
        # Interleave the tasks: every batch of the check mixes prefixes of P = 8, 20 and 10.
        lines = [l for _, _, l in sorted(lines, key=lambda x: (x[0], x[1]))]
        with open(cases_path, "w") as f:
            for l in lines:
                f.write(json.dumps(l) + "\n")
        return lines


    def prefixd_logits(extra_env=None, dtype="f32", batch=16):
        argv = [binary, "classify", "--model", model_dir, "--max-length", "128", "--batch-size",
                str(batch), "--dtype", dtype, "--input", cases_path] + pdev
        for name, _, _, _ in TASKS:
            argv += ["--prefix", adapters[name]]
        out = sh(argv, dict(env, **(extra_env or {})))
        return [json.loads(l) for l in out.splitlines()]

    def compare(got):
        worst, agree = 0.0, 0
        for r, g in zip(ref, got):
            assert r["task"] == g["task"], (r["task"], g["task"])
            worst = max(worst, max(abs(a - b) for a, b in zip(r["logits"], g["logits"])))
            agree += int(max(range(len(r["logits"])), key=r["logits"].__getitem__) == g["label_id"])
        return {"rows": len(got), "max_abs_logit_diff": worst, "argmax_agree": agree}

    parity = {}
    if ref:
        # Half precision runs the tensor-core attention kernel by default; PREFIXD_ATTENTION=matmul
        # is the batched-matmul path it replaced.
        for label, kw in [("f32_fused", {}), ("f32_reference_path", {"extra_env": {"PREFIXD_REFERENCE_PATH": "1"}}),
                          ("bf16", {"dtype": "bf16"}), ("f16", {"dtype": "f16"}),
                          ("bf16_batched_matmuls", {"dtype": "bf16", "extra_env": {"PREFIXD_ATTENTION": "matmul"}}),
                          ("f16_batched_matmuls", {"dtype": "f16", "extra_env": {"PREFIXD_ATTENTION": "matmul"}})]:
            r = step(f"parity_{label}")(lambda kw=kw: compare(prefixd_logits(**kw)))
            if r:
                parity[label] = r
        if "f32_fused" in parity:
            parity["f32_fused"]["pass_1e-4"] = parity["f32_fused"]["max_abs_logit_diff"] <= 1e-4
    report["parity_vs_peft"] = parity

    # The attention kernel alone against PyTorch (scripts/gpu_attention_check.py), from the PTX
    # that is in the binary.
    ptx = os.path.join(REPO, ".gpu/kernels.ptx")
    if dev == "cuda" and os.path.exists(ptx):
        report["attention_kernel"] = step("attention_kernel")(lambda: json.loads(sh(
            [sys.executable, os.path.join(REPO, "scripts/gpu_attention_check.py"), ptx], env,
            timeout=120).strip().splitlines()[-1]))

    # Throughput, the same shapes and precisions in both engines.
    shapes = [(8, 16), (16, 32)] if quick else [(32, 64), (128, 128), (512, 128)]
    dtypes = [("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)]
    if dev == "cpu":
        dtypes = dtypes[:1]
    elif focus:
        dtypes = dtypes[1:]

    def pbench(*extra):
        out = sh([binary, "bench", "--model", model_dir, "--seconds", str(secs), "--prefix-len", "20"]
                 + pdev + list(extra), env, timeout=240)
        return json.loads(out.strip().splitlines()[-1])

    def timed(fn, warmup, min_calls):
        for _ in range(warmup):
            fn()
        times, t0 = [], time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - t0 < secs:
            a = time.perf_counter()
            fn()
            times.append(time.perf_counter() - a)
        return statistics.median(times)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def torch_throughput(model, batch, seq):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30522, (batch, seq), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        ids = ids.to(dev)
        mask, types = torch.ones_like(ids), torch.zeros_like(ids)

        def call():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, token_type_ids=types)
            sync()
        return batch / timed(call, 5, 10)

    rows = []
    for dname, dt in dtypes:
        tmodel = step(f"torch_load_{dname}")(lambda dt=dt: load_peft(adapters["bench"], 2, dt)) if adapters else None
        for b, s in shapes:
            p = step(f"prefixd_{dname}_{b}x{s}")(lambda b=b, s=s: pbench("--dtype", dname, "--batch", str(b), "--seq-len", str(s)))
            if p and "placement" not in report:
                report["placement"] = p.get("placement")
            t = step(f"torch_{dname}_{b}x{s}")(lambda b=b, s=s: torch_throughput(tmodel, b, s)) if tmodel else None
            row = {"dtype": dname, "batch": b, "seq_len": s,
                   "prefixd_seq_per_s": p and p["seq_per_s"], "torch_seq_per_s": t}
            if p and t:
                row["ratio"] = p["seq_per_s"] / t
            rows.append(row)
            print(f"[gpu-check] {row}", flush=True)
        # Batch-1 latency: tokenize + forward + argmax of one short sentence.
        if dname in ("f32", "bf16") and not focus:
            p = step(f"prefixd_latency_{dname}")(lambda: pbench("--dtype", dname, "--latency"))

            def one(model=tmodel):
                enc = tok.encode(SENTENCE)
                ids = torch.tensor([enc.ids], device=dev)
                with torch.inference_mode():
                    out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                token_type_ids=torch.tensor([enc.type_ids], device=dev))
                return int(out.logits.argmax(-1))
            t = step(f"torch_latency_{dname}")(lambda: timed(one, 20, 50) * 1e3) if tmodel else None
            lat = {"dtype": dname, "prefixd_ms": p and p["median_ms"], "torch_ms": t}
            if p and t:
                lat["ratio"] = p["median_ms"] / t
            report.setdefault("latency_batch1", []).append(lat)
        del tmodel
        if dev == "cuda":
            torch.cuda.empty_cache()
    report["throughput"] = rows
    # The fused path against candle's op-by-op chain, same binary, one shape.
    b, s = shapes[1]
    ref_path = None if focus else step("prefixd_reference_path")(lambda: sh(
        [binary, "bench", "--model", model_dir, "--seconds", str(secs), "--batch", str(b),
         "--seq-len", str(s)] + pdev, dict(env, PREFIXD_REFERENCE_PATH="1"), timeout=240))
    if ref_path:
        fused = next((r for r in rows if r["dtype"] == "f32" and (r["batch"], r["seq_len"]) == (b, s)), None)
        ref_sps = json.loads(ref_path.strip().splitlines()[-1])["seq_per_s"]
        report["fused_vs_op_by_op"] = {"shape": f"{b}x{s}", "op_by_op_seq_per_s": ref_sps,
                                       "fused_seq_per_s": fused and fused["prefixd_seq_per_s"]}

    # The tensor-core attention kernel (the half-precision default) against the batched-matmul
    # attention it replaced, same binary.
    kernel_rows = []
    for b, s in shapes if dev == "cuda" else []:
        k = step(f"prefixd_bf16_batched_matmuls_{b}x{s}")(lambda b=b, s=s: json.loads(sh(
            [binary, "bench", "--model", model_dir, "--seconds", str(secs), "--batch", str(b), "--seq-len",
             str(s), "--dtype", "bf16"] + pdev, dict(env, PREFIXD_ATTENTION="matmul"), timeout=240).strip().splitlines()[-1]))
        w8 = step(f"prefixd_bf16_attention_8_warps_{b}x{s}")(lambda b=b, s=s: json.loads(sh(
            [binary, "bench", "--model", model_dir, "--seconds", str(secs), "--batch", str(b), "--seq-len",
             str(s), "--dtype", "bf16"] + pdev, dict(env, PREFIXD_ATTENTION_WARPS="8"), timeout=240).strip().splitlines()[-1]))
        default = next((r for r in rows if r["dtype"] == "bf16" and (r["batch"], r["seq_len"]) == (b, s)), None)
        kernel_rows.append({"shape": f"{b}x{s}", "attention_kernel_seq_per_s": default and default["prefixd_seq_per_s"],
                            "attention_kernel_8_warps_seq_per_s": w8 and w8["seq_per_s"],
                            "batched_matmuls_seq_per_s": k and k["seq_per_s"]})
    report["attention_kernel_vs_batched_matmuls_bf16"] = kernel_rows

    # 32 tasks mixed in one batch vs one task.
    b, s = shapes[0]
    one = None if focus else step("prefixd_1task")(lambda: pbench("--batch", "32", "--seq-len", str(s), "--tasks", "1"))
    many = None if focus else step("prefixd_32tasks")(lambda: pbench("--batch", "32", "--seq-len", str(s), "--tasks", "32"))
    if one and many:
        report["mixed_32_tasks_vs_one"] = {"one_task_seq_per_s": one["seq_per_s"],
                                           "32_tasks_seq_per_s": many["seq_per_s"],
                                           "ratio": many["seq_per_s"] / one["seq_per_s"]}

    # Training steps: forward with dropout, backward, clipping, AdamW; batch 32.
    tb, ts = (4, 16) if quick else (32, 64)
    p = step("prefixd_train")(lambda: pbench("--train", "--batch", str(tb), "--seq-len", str(ts)))
    # The hand-written device backward (fused/train.rs) against candle's autograd over the
    # op-by-op forward, which GPU training ran before it.
    p_ref = step("prefixd_train_autograd")(lambda: json.loads(sh(
        [binary, "bench", "--model", model_dir, "--seconds", str(secs), "--train", "--batch", str(tb),
         "--seq-len", str(ts)] + pdev, dict(env, PREFIXD_REFERENCE_PATH="1"), timeout=240).strip().splitlines()[-1]))

    def torch_train():
        torch.manual_seed(0)
        m = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2, attn_implementation="sdpa")
        m = get_peft_model(m, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=20)).to(dev)
        m.train()
        params = [q for q in m.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        ids = torch.randint(1000, 30522, (tb, ts))
        ids[:, 0], ids[:, -1] = 101, 102
        ids = ids.to(dev)
        mask, types = torch.ones_like(ids), torch.zeros_like(ids)
        labels = (torch.arange(tb) % 2).to(dev)

        def one_step():
            out = m(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            sync()
        return tb / timed(one_step, 3, 10)
    t = step("torch_train")(torch_train)
    report["training_batch32"] = {"batch": tb, "seq_len": ts, "prefixd_examples_per_s": p and p["examples_per_s"],
                                  "prefixd_autograd_examples_per_s": p_ref and p_ref["examples_per_s"],
                                  "torch_examples_per_s": t, "ratio": (p["examples_per_s"] / t) if p and t else None}

    devices = ["cuda", "cpu"] if dev == "cuda" else ["cpu"]
    report["training_same_seed"] = same_seed_training(binary, model_dir, env, devices[:1] if focus else devices, quick)

    report["total_seconds"] = round(time.time() - t_start, 1)
    path = os.path.join(args.out, "gpu-check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "errors"}, indent=1))
    print("\n| dtype | shape | prefixd seq/s | torch seq/s | ratio |")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
        print(f"| {r['dtype']} | {r['batch']}x{r['seq_len']} | {r['prefixd_seq_per_s']} | {r['torch_seq_per_s']} | {ratio} |")
    for e in report["errors"]:
        print(f"ERROR {e['step']}: {e['error']}")
    print(f"[gpu-check] wrote {path} in {report['total_seconds']} s; {len(report['errors'])} errors")

    # Where the time goes, kernel by kernel (Nsight Compute, if present and allowed): one large
    # half-precision forward, and the training steps at batch 32. Written after the report, so
    # they can only add. Each leaves a summary (per kernel: launches, total µs) and the raw CSV.
    if dev == "cuda" and shutil.which("ncu") and not quick:
        profiles = [("bf16-512x128", ["--launch-skip", "200", "--launch-count", "90"],
                     ["bench", "--dtype", "bf16", "--batch", "512", "--seq-len", "128", "--seconds", "0",
                      "--warmup", "3"]),
                    ("train-32x64", ["--launch-count", "6000"],
                     ["bench", "--train", "--batch", "32", "--seq-len", "64", "--seconds", "0"])]
        for name, window, cmd in profiles:
            try:
                prof = subprocess.run(
                    ["ncu", "--clock-control", "none", "--metrics", "gpu__time_duration.sum", "--csv"]
                    + window + [binary] + cmd[:1] + ["--model", model_dir, "--device", "cuda"] + cmd[1:],
                    env=env, capture_output=True, text=True, timeout=150)
                with open(os.path.join(args.out, f"ncu-{name}.csv"), "w") as f:
                    f.write(prof.stdout[-6_000_000:] + "\n# stderr\n" + prof.stderr[-20000:])
                with open(os.path.join(args.out, f"ncu-{name}-summary.json"), "w") as f:
                    json.dump(ncu_summary(prof.stdout), f, indent=1)
                print(f"[gpu-check] wrote ncu-{name}.csv and its summary", flush=True)
            except Exception as e:
                print(f"[gpu-check] ncu {name} skipped: {e}", flush=True)


def same_seed_training(binary, model_dir, env, devices, quick):
    """Training on the GPU learns what training on the CPU learns: the same seed, data and random
    model through both devices (the CPU run uses this machine's cores). With dropout the two
    paths draw different masks, so the runs are alike; without it the math is the same, so the
    per-epoch losses must agree to float rounding — the check of the GPU backward kernels."""
    def train_on(device, dropout, epochs):
        name = f"syn-{device}-{dropout}"
        out = os.path.join(WORK, f"{name}.safetensors")
        sh([binary, "train", "--model", model_dir, "--train", syn_train, "--eval", syn_eval,
            "--task", "syn", "-o", out, "--device", device, "--epochs", str(epochs), "--lr", "0.05",
            "--batch-size", "32", "--virtual-tokens", "10", "--max-length", "32", "--dropout", str(dropout),
            "--quiet"], env, timeout=300)
        with open(os.path.join(WORK, f"{name}.metrics.json")) as f:
            m = json.load(f)
        return {"epochs": [{"train_loss": e["train_loss"], "eval_accuracy": e["eval"]["accuracy"],
                            "examples_per_s": e["examples_per_s"]} for e in m["epochs"]],
                "best_epoch": m["best_epoch"]}
    syn_train, syn_eval = os.path.join(WORK, "syn-train.tsv"), os.path.join(WORK, "syn-eval.tsv")
    rng = random.Random(3)
    good, bad = ["great", "wonderful", "happy", "bright", "won"], ["terrible", "boring", "sad", "dark", "lost"]
    for path, n in [(syn_train, 64 if quick else 640), (syn_eval, 32 if quick else 320)]:
        with open(path, "w") as f:
            f.write("sentence\tlabel\n")
            for _ in range(n):
                label = rng.randrange(2)
                # A cue word three times among a few fillers: learnable even through a random BERT
                # (98% on the CPU at epoch 3).
                words = [rng.choice(WORDS) for _ in range(rng.randrange(2, 6))]
                for _ in range(3):
                    words.insert(rng.randrange(len(words) + 1), rng.choice(good if label else bad))
                f.write(" ".join(words) + f"\t{label}\n")
    out = {d: step(f"train_{d}")(lambda d=d: train_on(d, 0.1, 4)) for d in devices}
    plain = {d: step(f"train_{d}_no_dropout")(lambda d=d: train_on(d, 0.0, 2)) for d in devices}
    out["no_dropout"] = plain
    if len(devices) == 2 and all(plain.values()):
        a, b = (plain[d]["epochs"] for d in devices)
        out["no_dropout"]["max_rel_train_loss_diff"] = max(
            abs(x["train_loss"] - y["train_loss"]) / abs(y["train_loss"]) for x, y in zip(a, b))
    return out


def ncu_summary(text):
    """Per kernel name: launches and total µs, largest first, from ncu's --csv output."""
    import csv
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
    lines = [l for l in text.splitlines() if l.startswith('"')]
    per, total, launches = {}, 0.0, 0
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        us = float(row["Metric Value"].replace(",", "")) * scale.get(row.get("Metric Unit", "nsecond"), 1e-3)
        name = row["Kernel Name"][:120]
        c, t = per.get(name, (0, 0.0))
        per[name] = (c + 1, t + us)
        total += us
        launches += 1
    top = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {"launches": launches, "total_us": round(total, 1),
            "kernels": [{"name": k, "launches": c, "total_us": round(t, 1),
                         "share": round(t / total, 4) if total else None} for k, (c, t) in top]}

if __name__ == "__main__":
    main()
