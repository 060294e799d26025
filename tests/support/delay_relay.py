"""A TCP relay that adds latency: ``python -m tests.support.delay_relay --listen 127.0.0.1:9000 --to IP:PORT
--delay 0.1``. Runs inside a lab namespace (the kernel here has no netem); every chunk waits
``delay`` seconds in each direction, in order. Bounded: it exits after ``--max-seconds``."""

from __future__ import annotations

import argparse
import asyncio


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(65536)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))  # latency, not a bandwidth cap
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        writer.close()


async def _serve(listen: str, to: str, delay: float, max_seconds: float) -> None:
    host, port = listen.rsplit(":", 1)
    to_host, to_port = to.rsplit(":", 1)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, uw, delay), _pipe(ur, w, delay))

    server = await asyncio.start_server(handle, host, int(port))
    async with server:
        await asyncio.sleep(max_seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--delay", type=float, default=0.1, help="seconds each way")
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    args = ap.parse_args()
    asyncio.run(_serve(args.listen, args.to, args.delay, args.max_seconds))


if __name__ == "__main__":
    main()
