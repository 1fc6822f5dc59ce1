"""Ray programs: data streams, Train jobs, Tune sweeps, evaluation fan-out, the plan runner."""
