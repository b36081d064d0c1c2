"""A SIMULATED expert worker: it computes the real answer, then holds it until the cost model's time for
its share of the layer call on the simulated device (serving/simulated.py). Sleeping on the loop costs
no CPU, so other streams go on meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import torch

from moe_service.serving.worker.servicer import ExpertServicer
from moe_service.transport import fastwire


class SimulatedServicer(ExpertServicer):
    def __init__(self, *args, hold: Callable[[torch.Tensor], float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold = hold  # expert ids [N, K] (-1: none) -> the seconds an answer takes at least

    async def _answer(self, request: fastwire.Request, deadline: float | None) -> bytes:
        arrived = time.monotonic()
        answer = await super()._answer(request, deadline)
        await asyncio.sleep(max(0.0, arrived + self.hold(request.experts.tensor()) - time.monotonic()))
        return answer
