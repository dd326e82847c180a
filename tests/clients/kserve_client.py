"""KServe v2 through the real tritonclient HTTP client. Prints what the client got, as JSON.

usage: kserve_client.py HOST:PORT TASK
"""
import json
import sys

import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

url, task = sys.argv[1], sys.argv[2]
client = http.InferenceServerClient(url)
texts = np.array([b"a b c", "héllo wörld d".encode()], dtype=object)


def text(x):
    return x.decode() if isinstance(x, bytes) else x


out = {
    "server_live": client.is_server_live(),
    "server_ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(task),
    "unknown_ready": client.is_model_ready("no-such-task"),
    "server": client.get_server_metadata(),
    "metadata": client.get_model_metadata(task),
}

# The client's default: inputs in the binary tensor extension, all outputs.
binary = http.InferInput("text", [2], "BYTES")
binary.set_data_from_numpy(texts)
res = client.infer(task, [binary], request_id="r-1")
out["binary"] = {
    "id": res.get_response().get("id"),
    "logits": res.as_numpy("logits").tolist(),
    "probabilities": res.as_numpy("probabilities").tolist(),
    "label": [text(x) for x in res.as_numpy("label").tolist()],
}

# JSON inputs of shape [N, 1], one requested output.
plain = http.InferInput("text", [2, 1], "BYTES")
plain.set_data_from_numpy(texts.reshape(2, 1), binary_data=False)
res = client.infer(task, [plain], outputs=[http.InferRequestedOutput("label", binary_data=False)])
out["json"] = {
    "outputs": [o["name"] for o in res.get_response()["outputs"]],
    "label": [text(x) for x in res.as_numpy("label").tolist()],
}

for name, call in {
    "unknown_task": lambda: client.infer("no-such-task", [binary]),
    "wrong_input": lambda: client.infer(task, [http.InferInput("pixels", [2], "BYTES").set_data_from_numpy(texts)]),
}.items():
    try:
        call()
        out[name] = None
    except InferenceServerException as e:
        out[name] = {"status": e.status(), "message": e.message()}

print(json.dumps(out))
