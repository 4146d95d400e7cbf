"""Lines on stdin to Kafka, one record per line: the plain tool the relay's Kafka sink is
measured against.

    docker events --format '{{json .}}' | python bench/plain/kafka_forward.py HOST:PORT TOPIC

One aiokafka producer with the relay's Kafka sink defaults (acks=all, linger_ms=5, 16 KiB
batches) except idempotence, which tansu cannot do (DESIGN.md section 5) and the relay is
measured without too. No key (the partitioner spreads the records), no parsing, no headers.
Exits at the end of stdin once every record is acknowledged.
"""

from __future__ import annotations

import asyncio
import sys

from aiokafka import AIOKafkaProducer


async def forward(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        max_batch_size=16384,
        enable_idempotence=False,
    )
    await producer.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    failed = 0

    def done(future: asyncio.Future[object]) -> None:
        nonlocal failed
        if future.cancelled() or future.exception() is not None:
            failed += 1

    try:
        while line := await reader.readline():
            # send() returns once the record is in the producer's batch; the broker's ack
            # comes later, like a pipe that never waits for its reader.
            (await producer.send(topic, line.rstrip(b"\n"))).add_done_callback(done)
    finally:
        await producer.stop()  # flushes what is still batched
        if failed:
            print(f"kafka_forward: {failed} records failed", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(forward(sys.argv[1], sys.argv[2]))
