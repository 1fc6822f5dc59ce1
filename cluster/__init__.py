"""The entry layer: command line, cluster connection, job submission."""
