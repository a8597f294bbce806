"""Training scripts, one per task, and the helpers they share (config, loop, export, registry)."""
