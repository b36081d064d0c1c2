"""Where a gateway's device meets the wire: one layer call's tensors to the host, its answer back.

On a GPU gateway, per layer call: the routing (expert ids and gate weights, packed as one `[T, 2K]`
tensor) and the hidden rows `[T, D]` are copied to the host into pinned buffers, which the plan
and the requests' bytes are then built from (two device-to-host copies, one wait for both). The
workers' answers are added into a pinned `[T, D]` buffer that goes back with one non-blocking
host-to-device copy. Tensors already on the host pass through untouched: a CPU gateway copies
nothing here.
"""

from __future__ import annotations

import torch

# T tokens, K experts per token, D hidden


class HostStaging:
    """One thread's staging buffers (pinned when a CUDA device is involved), reused call after call.

    A buffer is reused only after the thread's next device-to-host copy has been waited for, and the
    stream runs in order, so the previous call's host-to-device copy has finished by then."""

    def __init__(self, always: bool = False) -> None:
        self.always = always  # stage host tensors too (tests run the GPU path's logic on a CPU machine)
        self._buffers: dict[str, torch.Tensor] = {}
        self.copies = {"to_host": 0, "to_device": 0}

    def _staged(self, t: torch.Tensor) -> bool:
        return self.always or not t.is_cpu

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = self._buffers[name] = torch.empty(max(n, 1), dtype=dtype, pin_memory=pin)
        return buf[:n].view(shape)

    def to_host(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D], weights [T, K], experts [T, K] on the gateway's device -> the same on the host, the
        experts as int32 (the wire's form)."""
        if not self._staged(x):
            return x, weights, experts
        pin = x.is_cuda
        K = experts.shape[1]
        # ids below 2^24 are exact in fp32: the ids and the weights travel as one tensor
        route = torch.cat([experts.to(torch.float32), weights.to(torch.float32)], dim=1)  # [T, 2K]
        route_h = self._buffer("route", tuple(route.shape), torch.float32, pin)
        x_h = self._buffer("hidden", tuple(x.shape), x.dtype, pin)
        route_h.copy_(route, non_blocking=pin)
        x_h.copy_(x, non_blocking=pin)
        if pin:
            torch.cuda.current_stream(x.device).synchronize()  # the plan needs the ids now
        self.copies["to_host"] += 2
        return x_h, route_h[:, K:], route_h[:, :K].to(torch.int32)

    def answer_buffer(self, like: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """A host buffer for the combined answer ([T, D] like `like`) when it goes to `device`."""
        if not (self.always or device.type != "cpu"):
            return None
        return self._buffer("answer", tuple(like.shape), like.dtype, device.type == "cuda")

    def to_device(self, y: torch.Tensor, device: torch.device) -> torch.Tensor:
        if y.device == device and not self.always:
            return y
        self.copies["to_device"] += 1
        if y.device == device:  # staged on a CPU machine: a copy all the same, the buffer is reused
            return y.clone()
        return y.to(device, non_blocking=y.is_pinned())
