"""The same NBD core and FileStorage served by asyncio instead of a thread per connection.

Kept only to measure the concurrency-model decision (docs/decisions/0001-concurrency-model.md):

    .venv/bin/python bench/asyncio_model.py FILE PORT &
    fio --ioengine=nbd --uri=nbd://127.0.0.1:PORT/disk --rw=randread --bs=4k --iodepth=16 ...
"""

from __future__ import annotations

import asyncio
import sys

from backend.nbd import (
    NEED_DATA,
    ExportListRequested,
    ExportRequested,
    ExportSelected,
    Request,
    ServerConnection,
)
from backend.nbd.constants import Cmd
from backend.server.exports import Export, ExportTable
from backend.storage import FileStorage


async def serve_client(
    table: ExportTable, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    conn = ServerConnection()
    writer.write(conn.data_to_send())
    chosen = storage = None
    while True:
        event = conn.next_event()
        writer.write(conn.data_to_send())
        if event is NEED_DATA:
            await writer.drain()
            data = await reader.read(262144)
            conn.receive_data(data)
            continue
        if isinstance(event, ExportRequested):
            chosen = table.get(event.name)
            if chosen is None:
                conn.export_refused()
            else:
                conn.export_chosen(chosen.describe())
        elif isinstance(event, ExportListRequested):
            conn.export_list(table.exports())
        elif isinstance(event, ExportSelected):
            assert chosen is not None
            storage = chosen.storage
        elif isinstance(event, Request) and storage is not None:
            if event.command == Cmd.READ:
                data = storage.read(event.offset, event.length)
                writer.writelines(conn.reply_read(event.cookie, event.offset, data))
            elif event.command == Cmd.WRITE:
                storage.write(event.offset, event.payload)
                writer.write(conn.reply_ok(event.cookie))
            else:
                writer.write(conn.reply_ok(event.cookie))
        else:
            writer.close()
            return


async def main(path: str, port: int) -> None:
    table = ExportTable([Export("disk", FileStorage(path))])
    server = await asyncio.start_server(lambda r, w: serve_client(table, r, w), "127.0.0.1", port)
    print(f"asyncio model listening on nbd://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
