"""Ray actors wrapping introspect objects (ModelHost: one model per GPU). Built in the Ray engine issue."""
