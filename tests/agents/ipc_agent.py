"""A job process that breaks the IPC protocol on purpose: its job's metadata names the
malformed frame it writes straight onto its IPC socket (the fd is in argv), then it waits
for the server to deal with it."""

from __future__ import annotations

import os
import sys

import trio

from trio_agents import JobContext

#: JSON payloads the server must refuse (tag 7 is LogRecord, 8 JobFinished; level 50 so that
#: the server does not skip the record as below its log level).
PAYLOADS = {
    "ok": None,
    "huge_int": '[7,"x",' + "9" * 5000 + ',"m",1.0,"","",0,"",{}]',
    "deep": "[7," + "[" * 10_000 + "]" * 10_000 + "]",
    "created_infinity": '[7,"x",50,"m",Infinity,"","",0,"",{}]',
    "reserved_field": '[7,"x",50,"m",1.0,"","",0,"",{"__class__":1}]',
    "bad_outcome": '[8,"maybe","",false,""]',
}


async def entrypoint(ctx: JobContext) -> None:
    payload = PAYLOADS[ctx.job.metadata]
    if payload is None:
        return
    data = payload.encode()
    frame = len(data).to_bytes(4, "big") + data
    fd = int(sys.argv[1])
    assert len(frame) < 64 * 1024  # taken whole by the socket: no other frame can interleave
    assert os.write(fd, frame) == len(frame)
    await trio.sleep_forever()
