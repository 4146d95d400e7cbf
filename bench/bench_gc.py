"""How long a full garbage collection stops the relay, with and without `gc.freeze()`.

    .venv/bin/python -m bench.bench_gc [--runs 5]

In a fresh process (the relay's own state, not this one's), import what `docker-event-relay
run` holds with all three sinks (the core, the adapters, aiokafka, paho-mqtt, aiohttp,
aiodocker), build the settings and sinks as `relay.cli` does, then time `gc.collect()` (a full
collection: what CPython runs every so often as objects survive), before and after
`gc.freeze()`, which `relay.cli` calls once everything is built. Every full collection is a
pause of the event loop; the relay's latency tail sees it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import gc, json, os, sys, tempfile, time
os.environ["RELAY_STATE_DIR"] = tempfile.mkdtemp()
os.environ["RELAY_SINKS"] = json.dumps([
    {"type": "kafka", "bootstrap_servers": ["127.0.0.1:9092"]},
    {"type": "mqtt", "host": "127.0.0.1"},
    {"type": "webhook", "url": "http://127.0.0.1:8080/hook"},
])
import aiodocker, aiohttp, aiokafka, paho.mqtt.client
import relay.app
from relay import plugins
settings = plugins.load(None)
built = plugins.build_sinks(settings)

def full() -> float:
    started = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - started) * 1e3

gc.collect()  # the first collection also frees the import garbage: not a steady pause
before = [full() for _ in range(3)]
objects = len(gc.get_objects())
gc.freeze()
after = [full() for _ in range(3)]
print(json.dumps({"objects": objects, "before": min(before), "after": min(after)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, "-c", CHILD], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    med = statistics.median
    print(
        f"full collection, medians of {args.runs} processes (each the fastest of 3): "
        f"{med(r['before'] for r in results):.1f} ms over "
        f"{med(r['objects'] for r in results):,.0f} tracked objects; after gc.freeze(): "
        f"{med(r['after'] for r in results):.3f} ms"
    )


if __name__ == "__main__":
    main()
