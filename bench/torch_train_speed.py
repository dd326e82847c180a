#!/usr/bin/env python3
"""PyTorch + PEFT prefix-tuning training speed, the yardstick for `prefixd bench --train`.

Same shapes as prefixd's: `--batch` rows of `--seq-len` random token ids, P virtual tokens, one
optimizer step (forward, backward, AdamW, clip at 1.0) per timed call, dropout on (train mode),
fp32, 2 threads. Uses the environment of ../shared/bench/torch_baseline.py. Prints one JSON line.

    /tmp/torchref/bin/python bench/torch_train_speed.py --model models/all-minilm-l6-v2 --batch 16 --seq-len 64
"""
import argparse, json, statistics, time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    import torch
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import BertForSequenceClassification

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(args.model, num_labels=2, attn_implementation="sdpa")
    model = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=args.prefix_len))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    ids = torch.randint(1000, 30522, (args.batch, args.seq_len))
    ids[:, 0], ids[:, -1] = 101, 102
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    labels = torch.arange(args.batch) % 2
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    print(json.dumps({"engine": "pytorch+peft", "mode": "train", "batch": args.batch, "seq_len": args.seq_len,
                      "prefix_len": args.prefix_len, "threads": args.threads, "median_step_ms": step * 1000,
                      "examples_per_s": args.batch / step, "steps": len(times), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
