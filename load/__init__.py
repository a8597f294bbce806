"""Locust load tests and the bounded headless runner (``python -m load.run``)."""
