"""Lethe: exact machine unlearning with SISA ensembles on S3, retrained on Ray Train.

Layout of the package:
- ``lethe.core``: plain Python, no network: hashing, manifests, lineage, planning, cost.
- ``lethe.store`` / ``lethe.layout`` / ``lethe.generations``: the S3 side (boto3).
- ``lethe.ingest``, ``lethe.erasure``, ``lethe.verify``: the engine's steps.
- ``lethe.training``, ``lethe.models``, ``lethe.predict``: torch and Ray Train
  (the ``train`` extra).
"""

__version__ = "0.1.0"
