"""The Hugging Face text-classification route through huggingface_hub's InferenceClient.
Prints what the client got, as JSON.

usage: hf_client.py BASE_URL TASK [API_KEY]
"""
import json
import sys

from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

base, task = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else None
client = InferenceClient(model=f"{base}/v1/tasks/{task}/predict", token=key)
out = {
    "all": [[e.label, e.score] for e in client.text_classification("a b c")],
    "top1": [[e.label, e.score] for e in client.text_classification("a b c", top_k=1)],
    "raw": [[e.label, e.score] for e in client.text_classification("a b c", function_to_apply="none")],
}
try:
    InferenceClient(model=f"{base}/v1/tasks/no-such-task/predict", token=key).text_classification("x")
    out["unknown_task"] = None
except HfHubHTTPError as e:
    out["unknown_task"] = {"status": e.response.status_code, "body": e.response.json()}
print(json.dumps(out))
