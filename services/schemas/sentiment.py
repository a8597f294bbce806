"""Sentiment request and response schemas."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from services.schemas.common import ModelInfo
from services.settings import SETTINGS

MAX_ITEMS = SETTINGS.http.max_items
MAX_TEXT_CHARS = SETTINGS.http.max_text_chars

EXAMPLE_TEXTS = [
    "A gripping, beautifully acted film that stays with you.",
    "It's a dull, lifeless mess and I wanted my two hours back.",
]
SENTIMENT_EXAMPLE = {"texts": EXAMPLE_TEXTS}
SENTIMENT_SINGLE_EXAMPLE = {"text": EXAMPLE_TEXTS[0]}


def _check_text(text: str) -> str:
    # Tokens are counted once, by the service against the model's own limit (services/sentiment.py).
    if not text.strip():
        raise ValueError("text is empty or only whitespace; send at least one word")
    return text


Text = Annotated[
    str,
    Field(max_length=MAX_TEXT_CHARS, description=f"English text, 1 to {MAX_TEXT_CHARS} "
          "characters and at most the model's token limit (a longer text is a 400 that names the limit)."),
    AfterValidator(_check_text),
]


class SentimentRequest(BaseModel):
    """One text (``text``) or a list (``texts``), never both. Unknown fields are rejected."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": SENTIMENT_EXAMPLE}
    )

    text: Text | None = Field(default=None, description="A single text to classify.")
    texts: list[Text] | None = Field(
        default=None, min_length=1, max_length=MAX_ITEMS,
        description=f"1 to {MAX_ITEMS} texts, answered in the same order.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> SentimentRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])

    def item_field(self, index: int) -> str:
        """The field path of item ``index``, for an error that names it."""
        return "text" if self.text is not None else f"texts[{index}]"


class SentimentResult(BaseModel):
    label: Literal["negative", "positive"] = Field(description="The more probable class.")
    score: float = Field(ge=0, le=1, description="Probability of ``label``.")
    probabilities: dict[str, float] = Field(
        description="Probability of each class; they sum to 1.",
        examples=[{"negative": 0.03, "positive": 0.97}],
    )
    tokens: int = Field(ge=1, description="Tokens the model read (the whole text, never truncated).")


class SentimentResponse(BaseModel):
    model: ModelInfo
    results: list[SentimentResult] = Field(description="One result per input text, in order.")
