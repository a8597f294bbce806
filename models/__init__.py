"""Pure model families: configs and ``nn.Module``s, no I/O. One family per file."""
