"""Dispatch plans and combine: pure functions over tensors (no Ray, no gRPC)."""

from moe_service.routing.dispatch import LayerRoutes, NoReplicaError, WorkerDispatch, combine, plan_dispatch

__all__ = ["LayerRoutes", "NoReplicaError", "WorkerDispatch", "combine", "plan_dispatch"]
