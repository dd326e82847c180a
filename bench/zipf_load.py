"""Load with a Zipf-distributed task mix against a running prefixd, plus the latency of
requests for tasks never asked for before (cold). Standard library only.

usage: zipf_load.py BASE_URL TASKS_FILE [--s 1.1] [--clients 8] [--seconds 10]
                    [--cold FILE_OF_COLD_TASKS] [--cold-requests 200]
Task ranks are a fixed random permutation of TASKS_FILE, so the hot tasks are spread over the
name space. Prints one JSON object.
"""
import argparse
import bisect
import http.client
import itertools
import json
import random
import threading
import time
from urllib.parse import urlparse

p = argparse.ArgumentParser()
p.add_argument("base")
p.add_argument("tasks_file")
p.add_argument("--s", type=float, default=1.1)
p.add_argument("--clients", type=int, default=8)
p.add_argument("--seconds", type=float, default=10)
p.add_argument("--cold")
p.add_argument("--cold-requests", type=int, default=200)
a = p.parse_args()
url = urlparse(a.base)
tasks = [t for t in open(a.tasks_file).read().split() if t]
random.Random(7).shuffle(tasks)
cdf = list(itertools.accumulate(1.0 / (k ** a.s) for k in range(1, len(tasks) + 1)))


def pick(rng):
    return tasks[bisect.bisect_left(cdf, rng.random() * cdf[-1])]


def one(conn, task):
    body = json.dumps({"task": task, "inputs": ["a gripping, beautifully acted film"]})
    conn.request("POST", "/v1/classify", body, {"content-type": "application/json"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status} for {task}")


out = {"tasks": len(tasks), "zipf_s": a.s, "clients": a.clients}
if a.cold:
    cold = [t for t in open(a.cold).read().split() if t][: a.cold_requests]
    conn = http.client.HTTPConnection(url.hostname, url.port)
    lat = []
    for t in cold:
        t0 = time.perf_counter()
        one(conn, t)
        lat.append((time.perf_counter() - t0) * 1e3)
    hot = []
    for _ in range(len(cold)):  # the same task again and again: always in memory
        t0 = time.perf_counter()
        one(conn, cold[0])
        hot.append((time.perf_counter() - t0) * 1e3)
    lat.sort()
    hot.sort()
    out.update(cold_p50_ms=lat[len(lat) // 2], cold_p99_ms=lat[int(0.99 * (len(lat) - 1))],
               hot_p50_ms=hot[len(hot) // 2], cold_requests=len(lat))

done = [0] * a.clients
warm = time.perf_counter() + 2  # let the hot set settle before counting
stop = warm + a.seconds


def client(i):
    c = http.client.HTTPConnection(url.hostname, url.port)
    r = random.Random(100 + i)
    while time.perf_counter() < stop:
        one(c, pick(r))
        if time.perf_counter() > warm:
            done[i] += 1


threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
out["rows_per_s"] = sum(done) / a.seconds
print(json.dumps(out))
