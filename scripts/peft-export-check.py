#!/usr/bin/env python3
"""Loads a prefix exported by `prefixd export-peft` with Hugging Face PEFT and compares its logits
with prefixd's. Needs the PyTorch environment of ../shared/bench/torch_baseline.py.

    target/release/prefixd export-peft prefixes/sst2.safetensors -o /tmp/sst2-peft
    target/release/prefixd classify --prefix prefixes/sst2.safetensors --max-length 128 \
        --text "a gorgeous , witty and deeply moving film ." --text "dull , lifeless and badly acted ." > /tmp/prefixd.jsonl
    /tmp/torchref/bin/python scripts/peft-export-check.py models/all-minilm-l6-v2 /tmp/sst2-peft /tmp/prefixd.jsonl
"""
import json, sys, torch
from transformers import BertForSequenceClassification
from peft import PeftModel
from tokenizers import Tokenizer
model_dir, adapter, expected = sys.argv[1], sys.argv[2], sys.argv[3]
labels = json.load(open(f"{adapter}/prefixd.json"))["labels"]
base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
model = PeftModel.from_pretrained(base, adapter).eval()
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json"); tok.no_padding(); tok.enable_truncation(max_length=128)
worst = 0.0
for text, line in zip(["a gorgeous , witty and deeply moving film .", "dull , lifeless and badly acted ."], open(expected)):
    enc = tok.encode(text)
    ids = torch.tensor([enc.ids])
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.tensor([enc.type_ids])).logits[0]
    want = json.loads(line)["logits"]
    d = max(abs(a - b) for a, b in zip(logits.tolist(), want))
    worst = max(worst, d)
    print(text, logits.tolist(), want, f"{d:.2e}")
print("max |Δlogit| PEFT vs prefixd:", worst)
