"""Image captioner: CNN encoder -> recurrent decoder, one image in, a sentence out (one-to-many).

The encoder's flattened feature map sets the decoder's initial hidden state (Vinyals et al. 2015,
"Show and Tell"); optionally the decoder also attends over the spatial features at every step
(Xu et al. 2015, "Show, Attend and Tell"; here the post-RNN "general" score of Luong et al. 2015). Greedy
and beam decoding are methods of the model, exported with TorchScript, so serving needs no Python
model code. Inputs are normalised float images; the normalisation lives in the artifact metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.rnn import CELLS, StatefulRNN, state_layers
from models.text import PAD, PAD_ID, UNK, UNK_ID

BOS, EOS = "<bos>", "<eos>"
BOS_ID, EOS_ID = 2, 3
SPECIALS = (PAD, UNK, BOS, EOS)


def caption_vocab(words: list[str]) -> list[str]:
    """The decoder vocabulary: ``<pad> <unk> <bos> <eos>`` then ``words`` (deduplicated, in order)."""
    seen = dict.fromkeys(w for w in words if w not in SPECIALS)
    return [*SPECIALS, *seen]


@dataclass(frozen=True)
class CaptionConfig:
    vocab_size: int
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)  # one conv block each; all but the last halve H, W
    embedding_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 1
    cell: str = "gru"
    attention: bool = False
    attention_size: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.vocab_size <= EOS_ID:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for words after the specials")
        if len(self.channels) < 1:
            raise ValueError("channels needs at least one conv block")
        if self.image_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by "
                             f"{2 ** (len(self.channels) - 1)} ({len(self.channels)} conv blocks)")

    @property
    def grid_size(self) -> int:
        """Side of the encoder's output feature map."""
        return self.image_size // 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class ImageEncoder(nn.Module):
    """Conv blocks over RGB plus two coordinate channels.

    The coordinate channels (Liu et al. 2018, "CoordConv") give every feature its absolute position,
    which a caption that names positions ("at the top left") needs, and which padding alone conveys
    only near the borders.

    Shape:
        images: (B, 3, S, S) normalised float.
        output: (B, G*G, C) spatial features with G = S / 2**(blocks - 1), C = channels[-1].
    """

    def __init__(self, config: CaptionConfig):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3 + 2
        for index, out_channels in enumerate(config.channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            if index < len(config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = out_channels
        self.blocks = nn.Sequential(*layers)
        steps = torch.linspace(-1.0, 1.0, config.image_size)
        ys, xs = torch.meshgrid(steps, steps, indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys]).unsqueeze(0), persistent=False)  # (1,2,S,S)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch_size = images.size(0)
        coords = self.coords.expand(batch_size, -1, -1, -1)  # (B, 2, S, S)
        features = self.blocks(torch.cat([images, coords], dim=1))  # (B, C, G, G)
        return features.flatten(2).transpose(1, 2)  # (B, G*G, C)


class DotAttention(nn.Module):
    """Luong "general" attention after the RNN: score_tn = (W_q h_t) . (W_k m_n) / sqrt(A).

    The query is the decoder output itself (no input feeding; Luong et al. 2015), so the whole
    teacher-forced sequence attends in one batched product instead of a Python loop over steps.

    Shape:
        keys(memory): (B, N, C) -> (B, N, A).
        forward: queries (B, T, H), memory (B, N, C), keys (B, N, A) -> context (B, T, C),
        weights (B, T, N).
    """

    def __init__(self, memory_size: int, query_size: int, attention_size: int):
        super().__init__()
        self.key = nn.Linear(memory_size, attention_size, bias=False)
        self.query = nn.Linear(query_size, attention_size, bias=False)
        self.scale = attention_size ** -0.5
        self.context_size = memory_size

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key(memory)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor,
                keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.bmm(self.query(queries), keys.transpose(1, 2)) * self.scale  # (B, T, N)
        weights = torch.softmax(scores, dim=2)
        return torch.bmm(weights, memory), weights  # (B, T, C), (B, T, N)


class NoAttention(nn.Module):
    """Stands in for ``DotAttention`` when attention is off: an empty context, (B, T, 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.context_size = 0

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return memory[:, :, :0]  # (B, N, 0)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor,
                keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return queries[:, :, :0], queries[:, :, :1] * 0.0  # (B, T, 0), (B, T, 1)


class Captioner(nn.Module):
    """CNN encoder + recurrent decoder with teacher-forced ``forward``, ``greedy`` and ``beam_search``.

    Rows of a batch never interact: BatchNorm runs in eval mode at inference, and every decoding
    state is per row, so a batched caption equals the caption of the image alone.
    """

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        # Plain int attributes: TorchScript cannot read module-level globals inside methods.
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        self.encoder = ImageEncoder(config)
        feature_size = config.channels[-1]
        flat_size = feature_size * config.grid_size ** 2
        # The initial state reads the whole flattened map, so it keeps where each feature is.
        self.init_state = nn.Linear(flat_size,
                                    state_layers(config.cell, config.num_layers) * config.hidden_size)
        self.attention = (DotAttention(feature_size, config.hidden_size, config.attention_size)
                          if config.attention else NoAttention())
        context_size = feature_size if config.attention else 0
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        # State (S*L, B, H), S = 2 for an LSTM (h stacked on c): the one convention of models.rnn.
        self.recurrence = StatefulRNN(config.cell, config.embedding_dim, config.hidden_size,
                                      num_layers=config.num_layers, dropout=config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.hidden_size + context_size, config.vocab_size)
        # Decoding never emits <pad>, <unk> or <bos>: they are never targets, and a caption made of
        # them means nothing. -inf before the softmax keeps the other probabilities normalised.
        never = torch.zeros(config.vocab_size)
        never[torch.tensor([PAD_ID, UNK_ID, BOS_ID])] = float("-inf")
        self.register_buffer("never_emitted", never, persistent=False)

    @torch.jit.export
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Spatial memory, attention keys and the initial state.

        Shape:
            images: (B, 3, S, S).
            output: memory (B, N, C), keys (B, N, A) (A = 0 without attention), state (S*L, B, H)
            with S = 2 for an LSTM (h stacked on c) and 1 otherwise.
        """
        memory = self.encoder(images)  # (B, N, C)
        state = self.recurrence.state_from_flat(torch.tanh(self.init_state(memory.flatten(1))))  # (S*L, B, H)
        return memory, self.attention.keys(memory), state

    @torch.jit.export
    def step(self, tokens: torch.Tensor, state: torch.Tensor, memory: torch.Tensor,
             keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: log-probabilities of the next token.

        Shape:
            tokens: (B,) int64, the previous token (``<bos>`` first).
            state: (S*L, B, H) as from ``encode``. memory: (B, N, C). keys: (B, N, A).
            output: log-probabilities (B, V), new state (S*L, B, H).
        """
        embedded = self.dropout(self.embedding(tokens)).unsqueeze(1)  # (B, 1, E)
        outputs, state = self.recurrence(embedded, state)  # (B, 1, H)
        logits = self._logits(outputs, memory, keys).squeeze(1) + self.never_emitted  # (B, V)
        return torch.log_softmax(logits, dim=-1), state

    def _logits(self, outputs: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, T, H) decoder outputs -> (B, T, V) logits, reading the attended context when on."""
        context, _ = self.attention(outputs, memory, keys)  # (B, T, C) or (B, T, 0)
        return self.output(self.dropout(torch.cat([outputs, context], dim=2)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token logits.

        Shape:
            images: (B, 3, S, S).
            tokens: (B, T) int64: ``<bos> w1 .. wn`` padded with ``<pad>``.
            output: logits (B, T, V); position t predicts token t + 1 (``<eos>`` after the last word).
        """
        memory, keys, state = self.encode(images)
        embedded = self.dropout(self.embedding(tokens))  # (B, T, E)
        outputs, _ = self.recurrence(embedded, state)  # (B, T, H): the whole sequence in one call
        return self._logits(outputs, memory, keys)  # (B, T, V)

    @torch.jit.export
    def greedy(self, images: torch.Tensor,
               max_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Most probable token at every step, until ``<eos>`` or the row's own length limit.

        Shape:
            images: (B, 3, S, S). max_lengths: (B,) int64, tokens allowed per row (``<eos>`` counts).
            output: tokens (B, T) with T = max(max_lengths), padded with ``<pad>``; their
            log-probabilities (B, T), 0 at padding; lengths (B,) including ``<eos>`` when emitted.
        """
        memory, keys, state = self.encode(images)
        batch_size = images.size(0)
        limit = int(max_lengths.max())
        tokens = torch.full((batch_size, limit), self.pad_id, dtype=torch.long, device=images.device)
        logprobs_out = torch.zeros((batch_size, limit), device=images.device)
        lengths = torch.zeros(batch_size, dtype=torch.long, device=images.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=images.device)
        current = torch.full((batch_size,), self.bos_id, dtype=torch.long, device=images.device)
        for t in range(limit):
            active = (~finished) & (max_lengths > t)  # (B,)
            if not bool(active.any()):
                break
            logprobs, state = self.step(current, state, memory, keys)  # (B, V)
            best_logprob, best = logprobs.max(dim=1)  # (B,), (B,)
            best = torch.where(active, best, torch.full_like(best, self.pad_id))
            tokens[:, t] = best
            logprobs_out[:, t] = torch.where(active, best_logprob, torch.zeros_like(best_logprob))
            lengths = lengths + active.long()
            finished = finished | (best == self.eos_id)
            current = best
        return tokens, logprobs_out, lengths

    @torch.jit.export
    def beam_search(self, images: torch.Tensor, max_lengths: torch.Tensor,
                    beam_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The highest-scoring caption among ``beam_size`` hypotheses per image.

        The score is the sum of token log-probabilities, with no length penalty. A finished
        hypothesis (``<eos>`` emitted, or its row's limit reached) stays in the beam at its score and
        only extends with ``<pad>`` at no cost, so it competes with the longer ones.

        Shape: as ``greedy``. ``beam_size`` 1 gives exactly the greedy caption.
        """
        memory, keys, state = self.encode(images)
        batch_size, beam = images.size(0), beam_size
        rows = batch_size * beam
        vocab = self.vocab_size
        device = images.device
        limit = int(max_lengths.max())
        # Expand every per-image tensor to one row per hypothesis: row b*K + k is beam k of image b.
        memory = memory.repeat_interleave(beam, dim=0)  # (B*K, N, C)
        keys = keys.repeat_interleave(beam, dim=0)  # (B*K, N, A)
        state = state.repeat_interleave(beam, dim=1)  # (S*L, B*K, H)
        scores = torch.full((batch_size, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical; keep one so the first step is not K copies
        tokens = torch.full((batch_size, beam, limit), self.pad_id, dtype=torch.long, device=device)
        token_logprobs = torch.zeros((batch_size, beam, limit), device=device)
        lengths = torch.zeros((batch_size, beam), dtype=torch.long, device=device)
        finished = torch.zeros((batch_size, beam), dtype=torch.bool, device=device)
        current = torch.full((rows,), self.bos_id, dtype=torch.long, device=device)
        pad_only = torch.full((vocab,), float("-inf"), device=device)
        pad_only[self.pad_id] = 0.0
        row_limit = max_lengths.view(batch_size, 1)
        for t in range(limit):
            frozen = finished | (row_limit <= t)  # (B, K)
            if bool(frozen.all()):
                break
            logprobs, state = self.step(current, state, memory, keys)
            logprobs = logprobs.view(batch_size, beam, vocab)  # (B, K, V)
            extended = torch.where(frozen.unsqueeze(2), pad_only.view(1, 1, vocab), logprobs)
            candidates = (scores.unsqueeze(2) + extended).view(batch_size, beam * vocab)  # (B, K*V)
            scores, flat_index = candidates.topk(beam, dim=1)  # (B, K)
            parent = torch.div(flat_index, vocab, rounding_mode="floor")  # (B, K)
            token = flat_index % vocab  # (B, K)
            step_logprob = logprobs.view(batch_size, beam * vocab).gather(1, flat_index)  # (B, K)
            was_frozen = frozen.gather(1, parent)
            step_logprob = torch.where(was_frozen, torch.zeros_like(step_logprob), step_logprob)
            history = parent.unsqueeze(2).expand(batch_size, beam, limit)
            tokens = tokens.gather(1, history)
            token_logprobs = token_logprobs.gather(1, history)
            tokens[:, :, t] = token
            token_logprobs[:, :, t] = step_logprob
            lengths = lengths.gather(1, parent) + (~was_frozen).long()
            finished = finished.gather(1, parent) | (token == self.eos_id)
            state_index = (parent + torch.arange(batch_size, device=device).view(-1, 1) * beam).view(rows)
            state = state.index_select(1, state_index)
            current = token.view(rows)
        best = scores.argmax(dim=1)  # (B,)
        pick = best.view(batch_size, 1, 1).expand(batch_size, 1, limit)
        return (tokens.gather(1, pick).squeeze(1), token_logprobs.gather(1, pick).squeeze(1),
                lengths.gather(1, best.view(batch_size, 1)).squeeze(1))
