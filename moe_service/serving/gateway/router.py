"""Cache-aware routing across gateway replicas: a Serve request router that sends a Generate call to the
replica already holding the longest prefix of its prompt in its KV cache, so that only the new tokens are
prefilled there.

Every call to the gateway passes a Serve router, whatever the front: Serve's gRPC proxy (behind HAProxy
or not) and the HTTP front's deployment handle route with the deployment's router, so one policy serves
both APIs. The HTTP front has applied the chat template and tokenized already; a gRPC call with text is
tokenized here as the gateway would, so the keys are the prefix cache's own (engine/blocks.py).

The policy, per call:
- the prompt's prefix keys (one per full 16-token block, chained);
- for each replica, how many leading keys it holds: what it last reported (`record_routing_stats`, every
  `ROUTING_STATS_PERIOD_S`) and what this router sent it since (a report is seconds old);
- the replica with the longest match, unless it is much busier than the least busy one (more than
  `imbalance` calls in flight more), is tried first, then the others;
- no match, or too busy: the power of two choices (Serve's default policy), the one with fewer calls in
  flight first, and between equally busy ones the one holding fewer cached blocks, so that new prefixes
  spread evenly over the replicas (a cache-aware router's "smallest tree").

Each choice is counted (`moe_router_choices{choice}`: affinity, fallback_busy, fallback_no_match) through
Ray's metrics, which Ray exports with a `ray_` prefix from the process that routes (Serve's proxy, the
HTTP front)."""

from __future__ import annotations

import pickle
import random
import time
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from moe_service.engine.blocks import prefix_keys
from moe_service.model.cache import BLOCK_SIZE

ROUTING_STATS_PERIOD_S = 2.0
GENERATE_METHODS = ("Generate", "http_generate")
REMEMBER = 200_000  # prefix keys this router remembers sending somewhere


def short(key: bytes) -> int:
    """A prefix key as the replicas report it: its first 8 bytes (a false match only costs a cache miss)."""
    return int.from_bytes(key[:8], "little")


class CacheAffinityRouter(RequestRouter):
    def initialize_state(self, model: str = "", imbalance: int = 8, remember_s: float = 60.0) -> None:
        self.model, self.imbalance, self.remember_s = model, imbalance, remember_s
        self.tokenizer = None
        self.sent: OrderedDict[int, tuple[ReplicaID, float]] = OrderedDict()  # key -> (replica, when)
        self.routing: OrderedDict[str, list[int]] = OrderedDict()  # a call's keys until it is routed
        self.reported: dict[ReplicaID, tuple[dict, frozenset]] = {}  # a replica's last report, and it as a set
        self.assigned: dict[ReplicaID, int] = {}  # keys in `sent` per replica
        from ray.util.metrics import Counter

        self.choices = Counter("moe_router_choices", "Generate calls routed, by choice: affinity (to the replica "
                               "holding the prompt's longest cached prefix), fallback_busy, fallback_no_match.",
                               tag_keys=("choice",))

    # ---- the prompt's keys --------------------------------------------------------------------

    def _request(self, pending: PendingRequest):
        if pending is None or pending.metadata.call_method not in GENERATE_METHODS or not pending.args:
            return None
        arg = pending.args[0]
        if isinstance(arg, bytes):  # Serve's gRPC proxy sends its request pickled
            try:
                arg = pickle.loads(arg).user_request_proto
            except Exception:
                return None
        return arg if hasattr(arg, "token_ids") else None  # a GenerateRequest (not grpc_api.Unparsed)

    def _keys(self, pending: PendingRequest) -> list[int]:
        req = self._request(pending)
        if req is None:
            return []
        if req.WhichOneof("prompt") == "token_ids":
            ids = list(req.token_ids.ids)
        elif req.text and self.model:
            ids = self._tokenizer().encode(req.text)
        else:
            return []
        # the gateway never takes a prompt's last token from the cache
        return [short(k) for k in prefix_keys(ids, BLOCK_SIZE, (len(ids) - 1) // BLOCK_SIZE)]

    def _tokenizer(self):
        if self.tokenizer is None:
            from moe_service.checkpoint import open_source
            from moe_service.engine.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.model, open_source(self.model).args)
        return self.tokenizer

    # ---- choosing --------------------------------------------------------------------------------

    def _held(self, replica: RunningReplica, keys: list[int], now: float) -> int:
        """Leading keys `replica` holds, as it reported or as this router sent it."""
        stats = replica.routing_stats or {}
        seen = self.reported.get(replica.replica_id)
        if seen is None or seen[0] is not stats:  # the object itself: an id could be reused once it is freed
            seen = self.reported[replica.replica_id] = (stats, frozenset(stats.get("prefixes") or ()))
        reported = seen[1]
        n = 0
        for k in keys:
            sent = self.sent.get(k)
            if k in reported or (sent and sent[0] == replica.replica_id and now - sent[1] < self.remember_s):
                n += 1
            else:
                break
        return n

    def _busy(self, replica: RunningReplica) -> int:
        q = self.replica_queue_len_cache.get(replica.replica_id)
        if q is None:
            q = (replica.routing_stats or {}).get("in_flight", 0)
        return q

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        keys = self._keys(pending_request) if pending_request is not None else []
        if keys:
            self.routing[pending_request.metadata.internal_request_id] = keys
            while len(self.routing) > 10_000:  # calls cancelled before they were routed
                self.routing.popitem(last=False)
        if keys and len(candidate_replicas) > 1:
            now = time.monotonic()
            held = {r.replica_id: self._held(r, keys, now) for r in candidate_replicas}
            best = max(candidate_replicas, key=lambda r: held[r.replica_id])
            if held[best.replica_id]:
                least = min(self._busy(r) for r in candidate_replicas)
                if self._busy(best) - least <= self.imbalance:
                    self.choices.inc(tags={"choice": "affinity"})
                    return [[best], *self._two(candidate_replicas, exclude=best)]
                self.choices.inc(tags={"choice": "fallback_busy"})
            else:
                self.choices.inc(tags={"choice": "fallback_no_match"})
        return self._two(candidate_replicas)

    def _size(self, replica: RunningReplica) -> int:
        """Blocks `replica` caches, as it reported or as this router sent it."""
        seen = self.reported.get(replica.replica_id)
        return max(len(seen[1]) if seen else 0, self.assigned.get(replica.replica_id, 0))

    def _two(self, replicas: list[RunningReplica], exclude: RunningReplica | None = None) -> list[list[RunningReplica]]:
        """Two at random, as ranks: the less busy first, the one caching less between equals."""
        pool = [r for r in replicas if r is not exclude]
        two = sorted(random.sample(pool, min(2, len(pool))), key=lambda r: (self._busy(r), self._size(r)))
        return [[r] for r in two]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """Remember where this prompt's blocks are going, until the replica's own report says so."""
        keys = self.routing.pop(pending_request.metadata.internal_request_id, None)
        if not keys:
            return
        now = time.monotonic()
        for k in keys:
            old = self.sent.get(k)
            if old is None or old[0] != replica_id:
                self._assign(old and old[0], -1)
                self._assign(replica_id, 1)
            self.sent[k] = (replica_id, now)
            self.sent.move_to_end(k)
        while len(self.sent) > REMEMBER:
            self._assign(self.sent.popitem(last=False)[1][0], -1)

    def _assign(self, replica_id: ReplicaID | None, n: int) -> None:
        if replica_id is not None:
            self.assigned[replica_id] = self.assigned.get(replica_id, 0) + n
