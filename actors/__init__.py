"""Ray actors wrapping introspect objects (ModelHost: one model per GPU)."""
