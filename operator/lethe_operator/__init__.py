"""The Lethe operator: kopf handlers that turn ErasureRequests into erasures.

- ``raylaunch``: the Ray Jobs API client (deterministic submission ids);
- ``metrics``: the Prometheus metrics on ``/metrics``;
- ``control``: the control logic, plain functions over the engine and the API;
- ``handlers``: thin kopf handlers that call ``control``.

Nothing here imports torch: training runs as Ray jobs (``python -m lethe.jobs``).
"""
