"""Every Locust user class of the project, one per service. Settings: ``load/locust.conf``."""

from load.sentiment_locust import SentimentUser

__all__ = ["SentimentUser"]
