"""The Lethe operator: kopf handlers that turn ErasureRequests into erasures.

- ``raylaunch``: the Ray Jobs API client (deterministic submission ids);
- ``metrics``: the Prometheus metrics on ``/metrics``;
- ``context``: what both sides share (conditions, a model's S3 side, its keys);
- ``control``: the ShardedModel side, plain functions over the engine and the API:
  layout ownership, ingest, training, batches;
- ``erasures``: the ErasureRequest side: targets, acceptance, the finalizer, the TTL;
- ``handlers``: thin kopf handlers that call ``control`` and ``erasures``.

Nothing here imports torch: training runs as Ray jobs (``python -m lethe.jobs``).
"""
