"""Block-group swap copies between the device KV cache and the host arena."""

from services.executor.copy.completions import CompletionStream
from services.executor.copy.cpu_backend import CpuCopyEngine
from services.executor.copy.engine import CopyEngine, SwapCompletion, SwapError, Ticket
from services.executor.copy.layout import DIRECTIONS, BlockLayout, Direction

__all__ = [
    "DIRECTIONS",
    "BlockLayout",
    "CompletionStream",
    "CopyEngine",
    "CpuCopyEngine",
    "Direction",
    "SwapCompletion",
    "SwapError",
    "Ticket",
]
