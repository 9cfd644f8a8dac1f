"""KV memory bookkeeping shared by the scheduler (device blocks) and the KV store (host blocks)."""
