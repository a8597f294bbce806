"""Locust user for the sentiment endpoint: real SST-2 dev sentences, one or several per request."""

from __future__ import annotations

import random

from locust import FastHttpUser, between, tag, task

from load.checks import check_results
from load.harness import sentences

SENTENCES = sentences()


class SentimentUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    @tag("sentiment")
    @task(4)
    def sentiment_one(self) -> None:
        text = random.choice(SENTENCES)
        with self.client.post("/v1/sentiment", json={"text": text}, name="/v1/sentiment [1]",
                              catch_response=True) as response:
            check(response, 1)

    @tag("sentiment")
    @task(1)
    def sentiment_many(self) -> None:
        texts = random.sample(SENTENCES, random.randint(2, 16))
        with self.client.post("/v1/sentiment", json={"texts": texts}, name="/v1/sentiment [2-16]",
                              catch_response=True) as response:
            check(response, len(texts))


def check(response, expected: int) -> None:
    check_results(response, expected,
                  lambda r: r["label"] in ("negative", "positive") and 0.5 <= r["score"] <= 1,
                  "malformed result")
