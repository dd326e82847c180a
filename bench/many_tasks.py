"""Load against a running prefixd: one client's latency and N clients' throughput, each request
one short SST-2-like sentence for a task drawn at random. Standard library only.

usage: many_tasks.py BASE_URL TASKS_FILE [--requests 300] [--clients 8] [--seconds 10]
Prints one JSON object.
"""
import argparse
import http.client
import json
import random
import statistics
import threading
import time
from urllib.parse import urlparse

SENTENCES = [
    "a gripping, beautifully acted film",
    "the plot is thin and the jokes fall flat",
    "an unexpectedly moving story about family",
    "two hours i will never get back",
    "sharp writing and a terrific cast",
]

p = argparse.ArgumentParser()
p.add_argument("base")
p.add_argument("tasks_file")
p.add_argument("--requests", type=int, default=300)
p.add_argument("--clients", type=int, default=8)
p.add_argument("--seconds", type=float, default=10)
a = p.parse_args()
url = urlparse(a.base)
tasks = [t for t in open(a.tasks_file).read().split() if t]


def one(conn, rng):
    body = json.dumps({"task": rng.choice(tasks), "inputs": [rng.choice(SENTENCES)]})
    conn.request("POST", "/v1/classify", body, {"content-type": "application/json"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}")


rng = random.Random(1)
conn = http.client.HTTPConnection(url.hostname, url.port)
for _ in range(20):
    one(conn, rng)
lat = []
for _ in range(a.requests):
    t = time.perf_counter()
    one(conn, rng)
    lat.append((time.perf_counter() - t) * 1e3)
lat.sort()

done = [0] * a.clients
stop = time.perf_counter() + a.seconds


def client(i):
    c = http.client.HTTPConnection(url.hostname, url.port)
    r = random.Random(100 + i)
    while time.perf_counter() < stop:
        one(c, r)
        done[i] += 1


threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
t0 = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - t0
print(json.dumps({
    "tasks": len(tasks),
    "p50_ms": statistics.median(lat),
    "p90_ms": lat[int(0.9 * len(lat))],
    "clients": a.clients,
    "rows_per_s": sum(done) / elapsed,
}))
