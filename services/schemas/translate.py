"""Translation (English -> Spanish) request and response schemas.

Types are strict: ``"beam_size": "4"`` or ``"text": 7`` is a 400 with the field named, not a silent
coercion. Unknown words and characters are never errors: the byte-level subword vocabulary covers
every Unicode character.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from services.schemas.common import ModelInfo
from services.settings import SETTINGS

MAX_ITEMS = SETTINGS.http.max_items
MAX_TEXT_CHARS = SETTINGS.translate.max_text_chars
MAX_LENGTH = SETTINGS.translate.max_length
MAX_BEAM_SIZE = SETTINGS.translate.max_beam_size
DEFAULT_BEAM_SIZE = 4
DEFAULT_LENGTH_PENALTY = 1.0

EXAMPLE_TEXTS = ["I love dogs.", "Where is the train station?"]
TRANSLATE_EXAMPLE = {"texts": EXAMPLE_TEXTS, "beam_size": 4}
TRANSLATE_SINGLE_EXAMPLE = {"text": EXAMPLE_TEXTS[0]}
TRANSLATE_STREAM_EXAMPLE = {"text": "Tom wants to know where you bought your car."}


def _check_text(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty or only whitespace; send at least one word")
    return text


Text = Annotated[
    str,
    Field(max_length=MAX_TEXT_CHARS,
          description=f"English text, 1 to {MAX_TEXT_CHARS} characters. It is never truncated."),
    AfterValidator(_check_text),
]
BeamSize = Annotated[int, Field(
    ge=1, le=MAX_BEAM_SIZE,
    description=f"Hypotheses kept per step, 1 to {MAX_BEAM_SIZE}. 1 is greedy decoding; larger is "
                "slower and usually a little better (see the model's test_bleu_* metrics).",
)]
MaxLength = Annotated[int, Field(
    ge=1, le=MAX_LENGTH,
    description=f"Most subword tokens to generate, 1 to {MAX_LENGTH}. A translation that reaches it "
                "is cut there and flagged ``truncated``.",
)]
LengthPenalty = Annotated[float, Field(
    ge=0.0, le=2.0,
    description="GNMT length normalisation exponent for beam search: hypotheses are ranked by "
                "log p / ((5 + length) / 6) ** length_penalty. 0 ranks by raw log-probability.",
)]


class TranslateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    beam_size: BeamSize = DEFAULT_BEAM_SIZE
    max_length: MaxLength = MAX_LENGTH
    length_penalty: LengthPenalty = DEFAULT_LENGTH_PENALTY
    return_attention: bool = Field(
        default=False, description="Also return the attention weights, one row per output token.")


class TranslateRequest(TranslateOptions):
    """One text (``text``) or a list (``texts``), never both, with decoding options for all of them."""

    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"example": TRANSLATE_EXAMPLE},
    )

    text: Text | None = Field(default=None, description="A single English text.")
    texts: list[Text] | None = Field(
        default=None, min_length=1, max_length=MAX_ITEMS,
        description=f"1 to {MAX_ITEMS} English texts, answered in the same order.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> TranslateRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self

    def items(self) -> list[TranslateItem]:
        options = self.model_dump(exclude={"text", "texts"})
        if self.text is not None:
            return [TranslateItem(text=self.text, field="text", **options)]
        return [TranslateItem(text=text, field=f"texts[{index}]", **options)
                for index, text in enumerate(self.texts or [])]


class TranslateItem(TranslateOptions):
    """One text with its own options: what the model service's decode loop receives."""

    text: Text
    field: str = Field(default="text", max_length=32, description=(
        "Where the text was in the request (text or texts[i]): the field a limit error names."))


class TranslateStreamRequest(BaseModel):
    """One text, translated greedily and sent token by token as server-sent events."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"example": TRANSLATE_STREAM_EXAMPLE})

    text: Text
    max_length: MaxLength = MAX_LENGTH


class Translation(BaseModel):
    translation: str = Field(description="The Spanish text.", examples=["Me encantan los perros."])
    input_tokens: int = Field(ge=1, description="Source subword tokens the encoder read.")
    output_tokens: int = Field(ge=0, description="Subword tokens generated (end-of-sentence excluded).")
    decode_steps: int = Field(ge=0, description="Decoder steps run for the batch this text was in.")
    beam_size: int = Field(ge=1, description="Beam size used (1 = greedy).")
    score: float = Field(description="Log-probability of the translation under the model.")
    truncated: bool = Field(description="True when generation stopped at max_length, not at an "
                                        "end-of-sentence token.")
    source_pieces: list[str] | None = Field(
        default=None, description="Source subwords (attention columns); only with return_attention.")
    output_pieces: list[str] | None = Field(
        default=None, description="Output subwords (attention rows); only with return_attention.")
    attention: list[list[float]] | None = Field(
        default=None, description="(output_tokens x input_tokens) attention weights; each row sums "
                                  "to 1. Only with return_attention.")


class TranslateResponse(BaseModel):
    model: ModelInfo
    results: list[Translation] = Field(description="One translation per input text, in order.")
