#!/usr/bin/env python3
"""Latency of 1,000 sequential creates next to 1,000 sequential raw JetStream
publishes (same headers, same server), in one run. Run `just up` first (local
config: sync_interval always), then:  pip install nats-py && python3 scripts/create_latency.py
Each raw publish goes to a fresh subject of a scratch file-backed stream on the
same server (deleted afterwards, so the posts data is untouched), with the
envelope headers and an expected-last-subject-sequence of 0, like a create. This is a
measurement, not a test: nothing here asserts a time."""
import asyncio, http.client, json, statistics, sys, time, uuid

import nats

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
BODY = json.dumps({"title": "A latency post", "content": "lorem ipsum dolor sit amet " * 4, "author_name": "bench"})


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def http_creates(n):
    c = http.client.HTTPConnection("127.0.0.1", 3000)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.request("POST", "/posts", BODY, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        assert r.status == 201, r.status
        out.append((time.perf_counter() - t) * 1000)
    return out


async def raw_publishes(n, payload_len):
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    await js.add_stream(name="LATENCY_PROBE", subjects=["latency-probe.>"], storage="file")
    out = []
    for _ in range(n):
        eid = str(uuid.uuid4())
        headers = {"Nats-Msg-Id": eid, "Nats-Expected-Last-Subject-Sequence": "0", "Event-Type": "PostCreated",
                   "Event-Schema": "1", "Occurred-At": "2026-01-01T00:00:00.000000Z", "Correlation-Id": eid, "Causation-Id": eid}
        t = time.perf_counter()
        await js.publish("latency-probe." + str(uuid.uuid4()), b"x" * payload_len, headers=headers)
        out.append((time.perf_counter() - t) * 1000)
    await js.delete_stream("LATENCY_PROBE")
    await nc.close()
    return out


http_creates(50)  # warm-up: connections, caches
a = http_creates(N)
b = asyncio.run(raw_publishes(N, 140))
for name, xs in (("HTTP POST /posts", a), ("raw JetStream publish", b)):
    print(f"{name:24} n={len(xs)} p50={pct(xs, 0.5):.2f} ms p99={pct(xs, 0.99):.2f} ms mean={statistics.mean(xs):.2f} ms")
