#!/usr/bin/env python3
"""Soak test: a running prefixd under twice the load it can serve, while admin uploads, deletes
and hand edits of the prefixes folder race the classify traffic. Standard library only.

Counts, all of which must be 0:
  wrong  a result inconsistent with its task version (the same version and input gave other
         logits before, or labels that are not the version's), or a version no writer made
  lost   a request with no HTTP answer (connection error, timeout)
  5xx    any 5xx answer except 503 during the final drain
Reported but expected: 429 (the queue is full: that is what 2x capacity means), 404 (a churned
task deleted just then), client_saturated (due requests the client did not send because it
already had MAX_IN_FLIGHT outstanding: it shares the cores with the server). RSS is sampled every
10 s and must stay flat.

    python3 bench/soak.py --bin target/release/prefixd --model models/all-minilm-l6-v2 --minutes 10
"""
import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

SENTENCES = [
    "a gorgeous, witty film", "dull and lifeless", "what is the capital of france",
    "free entry to win a prize, text now", "see you at the meeting tomorrow", "",
    "the plot meanders but the acting is superb and the ending lands", "who wrote hamlet ?",
    "urgent: your account needs verification, call this number",
    "I loved every minute of it, and I would watch it again with friends on a rainy sunday",
]
TOKEN = "soak-token"
# Requests the open-loop client keeps outstanding at most (see `open_loop`).
MAX_IN_FLIGHT = 256
# The server's queue bound in rows (--max-queue-rows).
QUEUE_ROWS = 256


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, key, n=1):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n


def request(addr, method, path, body=None, headers=None, timeout=60):
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/prefixd")
    ap.add_argument("--model", default="models/all-minilm-l6-v2")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--stable-tasks", type=int, default=8, help="tasks never touched by writers")
    ap.add_argument("--out", help="write the summary JSON here")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="prefixd-soak-")
    prefixes, pool = os.path.join(work, "prefixes"), os.path.join(work, "pool")
    subprocess.run([args.bin, "synth", "--model", args.model, "--count", str(args.stable_tasks),
                    "-o", prefixes], check=True, capture_output=True)
    subprocess.run([args.bin, "synth", "--model", args.model, "--count", "40", "-o", pool],
                   check=True, capture_output=True)
    stable = sorted(f[:-len(".safetensors")] for f in os.listdir(prefixes) if f.endswith(".safetensors"))
    pool_files = sorted(os.path.join(pool, f) for f in os.listdir(pool) if f.endswith(".safetensors"))
    known_versions = set()
    for d in (prefixes, pool):
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                known_versions.add("sha256:" + hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest())
    churn = [f"churn{i}" for i in range(6)]

    server = subprocess.Popen(
        [args.bin, "serve", "--model", args.model, "--prefixes", prefixes, "--addr", "127.0.0.1:0",
         "--admin-token", TOKEN, "--max-length", "128",
         # Below what MAX_IN_FLIGHT requests of 1-4 rows can queue, so overload still reaches
         # the admission path (429) with a bounded client.
         "--max-queue-rows", str(QUEUE_ROWS)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    addr = None
    for line in server.stdout:
        if line.startswith("prefixd listening on "):
            addr = line.split("http://")[1].strip()
            break
    threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
    counters, seen, seen_lock = Counters(), {}, threading.Lock()
    stop = threading.Event()

    def classify_once(task):
        inputs = random.sample(SENTENCES, random.randint(1, 4))
        body = json.dumps({"task": task, "inputs": inputs})
        try:
            status, data = request(addr, "POST", "/v1/classify", body, {"content-type": "application/json"})
        except Exception:
            counters.add("lost")
            return None
        counters.add(f"status_{status}")
        if status >= 500:
            counters.add("5xx")
        if status != 200:
            return status
        r = json.loads(data)
        version = r["version"]
        with seen_lock:
            for text, res in zip(inputs, r["results"]):
                key = (version, text)
                # Batches pad differently, so the same row may differ by float rounding, no more.
                prev = seen.setdefault(key, res["logits"])
                if len(prev) != len(res["logits"]) or max(abs(a - b) for a, b in zip(prev, res["logits"])) > 1e-4:
                    counters.add("wrong")
            seen.setdefault(("versions", version), True)
        return status

    # Capacity: 64 closed-loop clients for 10 s (enough that the batcher runs full batches).
    t0, done = time.time(), [0]

    def closed_loop():
        while time.time() - t0 < 10:
            if classify_once(random.choice(stable)) == 200:
                done[0] += 1
    ts = [threading.Thread(target=closed_loop) for _ in range(64)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    capacity = done[0] / 10.0
    target = 2 * capacity
    print(f"[soak] capacity ~{capacity:.1f} req/s; offering {target:.1f} req/s for {args.minutes} min", flush=True)

    # The client shares the 2 cores with a saturated server, so it can fall behind: each due
    # request then waits longer, and a thread per request piled up into thousands until Python
    # could start no more (MemoryError) and the generator died. In-flight requests are bounded:
    # a request due while MAX_IN_FLIGHT are outstanding is not sent and counted
    # `client_saturated`, so the summary says how much of the offered load was really sent.
    in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def send(task):
        try:
            classify_once(task)
        finally:
            in_flight.release()

    def open_loop():
        # Each worker fires at its share of the target rate, without waiting for answers.
        workers = 32
        interval = workers / target
        def worker():
            nxt = time.time()
            while not stop.is_set():
                nxt += interval
                task = random.choice(stable + churn)
                if in_flight.acquire(blocking=False):
                    try:
                        threading.Thread(target=send, args=(task,), daemon=True).start()
                    except RuntimeError:
                        in_flight.release()
                        counters.add("client_saturated")
                else:
                    counters.add("client_saturated")
                time.sleep(max(0.0, nxt - time.time()))
        return [threading.Thread(target=worker, daemon=True) for _ in range(workers)]

    def writer():
        # Uploads, deletes and hand edits of the churn tasks, a few times a second.
        while not stop.is_set():
            task = random.choice(churn)
            action = random.random()
            try:
                if action < 0.4:
                    data = open(random.choice(pool_files), "rb").read()
                    status, body = request(addr, "PUT", f"/v1/admin/tasks/{task}", data,
                                           {"authorization": f"Bearer {TOKEN}", "content-type": "application/octet-stream"})
                    counters.add(f"upload_{status}")
                    if status == 200:
                        known_versions.add(json.loads(body)["version"])
                    if status >= 500:
                        counters.add("5xx")
                elif action < 0.6:
                    status, _ = request(addr, "DELETE", f"/v1/admin/tasks/{task}", None,
                                        {"authorization": f"Bearer {TOKEN}"})
                    counters.add(f"delete_{status}")
                    if status >= 500:
                        counters.add("5xx")
                else:
                    src = random.choice(pool_files)
                    tmp = os.path.join(prefixes, f".{task}.edit")
                    shutil.copy(src, tmp)
                    os.rename(tmp, os.path.join(prefixes, f"{task}.safetensors"))
                    counters.add("hand_edit")
            except Exception:
                counters.add("lost")
            time.sleep(random.uniform(0.1, 0.4))

    def answered():
        with counters.lock:
            return sum(v for k, v in counters.c.items() if k.startswith("status_") or k == "lost")

    answered_before = answered()
    rss = []
    threads = open_loop() + [threading.Thread(target=writer, daemon=True)]
    [t.start() for t in threads]
    start = time.time()
    while time.time() - start < args.minutes * 60:
        rss.append((round(time.time() - start), rss_bytes(server.pid)))
        print(f"[soak] t={rss[-1][0]:4d}s rss={rss[-1][1] >> 20} MB {dict(sorted(counters.c.items()))}", flush=True)
        time.sleep(10)
    stop.set()
    time.sleep(5)  # let the last requests finish
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    with seen_lock:
        versions = {k[1] for k in seen if k[0] == "versions"}
    unknown = versions - known_versions
    counters.add("wrong", len(unknown))
    half = len(rss) // 2
    early = sum(r for _, r in rss[1:half]) / max(1, len(rss[1:half]))
    late = sum(r for _, r in rss[half:]) / max(1, len(rss[half:]))
    summary = {
        "minutes": args.minutes, "capacity_req_per_s": capacity, "offered_req_per_s": target,
        "sent_req_per_s": round((answered() - answered_before) / (args.minutes * 60), 1),
        "counts": dict(sorted(counters.c.items())), "wrong": counters.c.get("wrong", 0),
        "lost": counters.c.get("lost", 0), "5xx": counters.c.get("5xx", 0),
        "versions_seen": len(versions), "unknown_versions": sorted(unknown),
        "rss_mb": {"first": rss[0][1] >> 20, "max": max(r for _, r in rss) >> 20, "last": rss[-1][1] >> 20,
                   "mean_first_half": round(early / 2**20, 1), "mean_second_half": round(late / 2**20, 1)},
        "exit_code": server.returncode,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**summary, "rss_samples": rss}, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    ok = summary["wrong"] == 0 and summary["lost"] == 0 and summary["5xx"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
