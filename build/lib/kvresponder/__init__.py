"""
KV Responder: a self-discovering, multi-tenant, in-memory cache service for Kubernetes.
"""

__version__ = "0.1.0"
