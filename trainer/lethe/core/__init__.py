"""The SISA core: plain Python, no Kubernetes, no network, no torch."""
