"""The host KV store service: one shared-memory arena of host blocks and a reuse index.

- `store`: the state machine (index + arena + leases + stats), no I/O of its own;
- `backend`, `redis_storage`, `registry`: where chains live (in process, or Redis shared by
  several instances);
- `arena_setup`: each start creates `<arena-name>.<epoch>` and inherits a crashed run's
  bytes only if the Redis index still points at that exact segment;
- `service`: grpc.aio servicer, health, reflection; `bulk`: chunks and checksums;
  `batch_wire`: host intents (`common.kv.host_ops`) as Batch messages, for both ends;
- `config`, `assemble`, `__main__`: `python -m services.kvstore --help`.
"""
