"""Lethe's developer tooling, kept out of the engine package (``lethe``).

- ``localstack``: SeaweedFS and a Ray head on this machine (``lethe dev up``);
- ``kubestack``: etcd and kube-apiserver built from their Go modules, the operator as a
  child process (the demo, the tests and the operator benchmark);
- ``demo``: ``lethe demo`` / ``make demo``.

None of it ships in the images: the command line imports it only for ``lethe dev`` and
``lethe demo``.
"""
