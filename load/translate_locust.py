"""Locust user for translation: real test-split English sentences of varied length, mixed beam sizes,
single texts, lists, and the greedy stream."""

from __future__ import annotations

import json
import random

from locust import FastHttpUser, between, tag, task

from load.checks import check_results
from load.harness import translate_sentences

# The same held-out sentences the BLEU figures were measured on (split by hash of the English side).
SENTENCES = translate_sentences()
# Short, medium and long sentences in equal measure, so load is not just Tatoeba's many short lines.
BY_LENGTH = [[s for s in SENTENCES if low <= len(s.split()) < high]
             for low, high in ((1, 6), (6, 12), (12, 99))]
BEAM_SIZES = (1, 1, 2, 4, 4, 8)


def sentence() -> str:
    return random.choice(random.choice(BY_LENGTH))


class TranslateUser(FastHttpUser):
    wait_time = between(0.0, 0.1)

    @tag("translate")
    @task(4)
    def translate_one(self) -> None:
        body = {"text": sentence(), "beam_size": random.choice(BEAM_SIZES)}
        with self.client.post("/v1/translate", json=body, name="/v1/translate [1, beam 1-8]",
                              catch_response=True) as response:
            check(response, 1)

    @tag("translate")
    @task(1)
    def translate_many(self) -> None:
        texts = [sentence() for _ in range(random.randint(2, 8))]
        body = {"texts": texts, "beam_size": random.choice(BEAM_SIZES), "max_length": random.choice((20, 80))}
        with self.client.post("/v1/translate", json=body, name="/v1/translate [2-8, beam 1-8]",
                              catch_response=True) as response:
            check(response, len(texts))

    @tag("translate")
    @task(1)
    def translate_stream(self) -> None:
        with self.client.post("/v1/translate/stream", json={"text": sentence()},
                              name="/v1/translate/stream", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            events = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n")
                      if line.startswith("data: ")]
            if not events or not events[-1].get("done"):
                response.failure(f"stream did not end with a done event: {response.text[-200:]}")
            elif "".join(e.get("delta", "") for e in events[:-1]) != events[-1]["translation"]:
                response.failure("streamed deltas do not assemble to the final translation")
            else:
                response.success()


def check(response, expected: int) -> None:
    check_results(response, expected, lambda r: bool(r["translation"].strip()), "empty translation")
