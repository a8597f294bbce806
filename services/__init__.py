"""BentoML services. They load artifacts from the model store and never import ``training/``."""
