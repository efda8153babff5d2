"""Answer RPC calls from the room with trio functions, and call back.

    python examples/rpc_responder.py dev

A participant calls ``perform_rpc(destination_identity=<agent>, method="add",
payload='{"a": 1, "b": 2}')`` and gets ``"3"``. Needs the rtc extra.
"""

import json
import logging

import trio
from livekit import rtc

from trio_agents import AgentServer, JobContext, cli

logger = logging.getLogger("rpc-responder")

server = AgentServer()


@server.rtc_session(agent_name="rpc-responder")
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()

    @ctx.agent.register_rpc_method("add")
    async def add(data: rtc.RpcInvocationData) -> str:
        try:
            numbers = json.loads(data.payload)
            return str(numbers["a"] + numbers["b"])
        except (ValueError, KeyError, TypeError) as exc:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.APPLICATION_ERROR,
                               f'expected {{"a": number, "b": number}}: {exc}') from None

    @ctx.agent.register_rpc_method("slow-echo")
    async def slow_echo(data: rtc.RpcInvocationData) -> str:
        await trio.sleep(0.1)  # a trio handler can await anything trio can
        return data.payload

    # ask the caller who they are, once they are here
    participant = await ctx.wait_for_participant()
    try:
        answer = await ctx.agent.perform_rpc(destination_identity=participant.identity,
                                             method="whoami", payload="", response_timeout=5)
        logger.info("%s says they are %r", participant.identity, answer)
    except rtc.RpcError as exc:
        logger.info("%s did not answer whoami: %s", participant.identity, exc.message)


if __name__ == "__main__":
    cli.run_app(server)
