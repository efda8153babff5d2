"""IPC between the agent server and its job processes: framing, messages, channel."""

from ._channel import IpcChannel as IpcChannel
from ._framing import MAX_FRAME_SIZE as MAX_FRAME_SIZE
from ._framing import FrameDecoder as FrameDecoder
from ._framing import encode_frame as encode_frame
from ._messages import FAILED as FAILED
from ._messages import MESSAGES as MESSAGES
from ._messages import SUCCESS as SUCCESS
from ._messages import InitializeRequest as InitializeRequest
from ._messages import InitializeResponse as InitializeResponse
from ._messages import JobEnding as JobEnding
from ._messages import JobEndingAck as JobEndingAck
from ._messages import JobFinished as JobFinished
from ._messages import JobStarted as JobStarted
from ._messages import LogRecord as LogRecord
from ._messages import Message as Message
from ._messages import Ping as Ping
from ._messages import Pong as Pong
from ._messages import ShutdownRequest as ShutdownRequest
from ._messages import StartJob as StartJob
from ._messages import decode as decode
from ._messages import encode as encode
