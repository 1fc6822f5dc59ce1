"""Ray actors wrapping introspect objects (ModelHost: one model per GPU)."""

from actors.model_host import Host, HostPool, ModelHost, host_pool

__all__ = ["Host", "HostPool", "ModelHost", "host_pool"]
