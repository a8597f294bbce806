"""Attention encoder-decoder for translation (English -> Spanish), with greedy and beam decoding.

Many-to-many with Tx != Ty: a bidirectional recurrent encoder reads the source subwords; a recurrent
decoder writes target subwords one at a time, attending over every encoder state at each step.

The decoder follows Luong et al. (2015), "Effective Approaches to Attention-based Neural Machine
Translation": the recurrent state ``s_t`` is computed first, then it attends over the encoder states
(``general`` multiplicative score ``s_t^T W h_j``, or Bahdanau et al. 2015's ``additive`` score
``v^T tanh(W s_t + U h_j)``), and the attentional vector ``tanh(W_c [c_t; s_t])`` predicts the next
token. Without input feeding, teacher-forced training runs the decoder RNN over the whole target in one
fused call, which is what makes training affordable on a CPU. The output layer shares its weights with
the target embedding (Press & Wolf 2017), which halves the largest matrix of the model.

Decoding (batched greedy, batched beam search, and the single steps the streaming endpoint uses) is
part of the model and is exported with ``@torch.jit.export``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.rnn import CELLS, StatefulRNN, make_rnn, state_layers

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
ATTENTIONS = ("general", "additive")


@dataclass(frozen=True)
class TranslateConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    embedding_dim: int = 256
    encoder_hidden_size: int = 256  # per direction; the encoder is bidirectional
    decoder_hidden_size: int = 512
    attention_size: int = 256  # additive attention only
    cell: str = "gru"
    attention: str = "general"
    dropout: float = 0.2
    # Hard cap on generated tokens (EOS excluded); callers may ask for fewer, never more.
    max_output_length: int = 80

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Translator(nn.Module):
    """Bidirectional recurrent encoder, attentional recurrent decoder, tied output layer."""

    def __init__(self, config: TranslateConfig):
        super().__init__()
        self.max_output_length = config.max_output_length
        # Plain attributes, not module globals: TorchScript does not read Python globals.
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        self.additive = config.attention == "additive"
        self.decoder_hidden_size = config.decoder_hidden_size
        encoder_size = 2 * config.encoder_hidden_size

        self.src_embedding = nn.Embedding(config.src_vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        self.tgt_embedding = nn.Embedding(config.tgt_vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = make_rnn(config.cell, config.embedding_dim, config.encoder_hidden_size,
                                bidirectional=True)
        # The decoder starts from a projection of the mean encoder state (not a zero state).
        self.init_state = nn.Linear(encoder_size, state_layers(config.cell) * config.decoder_hidden_size)
        # One layer; its state is (S, B, Hd), S = 2 for an LSTM (h stacked on c), as models.rnn has it.
        self.decoder = StatefulRNN(config.cell, config.embedding_dim, config.decoder_hidden_size)
        # general: score = s^T W h; additive: score = v^T tanh(W s + U h).
        self.memory_key = nn.Linear(
            encoder_size, config.attention_size if self.additive else config.decoder_hidden_size,
            bias=False,
        )
        # Unused by ``general`` attention, but TorchScript compiles both branches: keep them 1-wide there.
        query_size = config.attention_size if self.additive else 1
        self.query = nn.Linear(config.decoder_hidden_size, query_size, bias=True)
        self.energy = nn.Linear(query_size, 1, bias=False)
        self.combine = nn.Linear(encoder_size + config.decoder_hidden_size, config.embedding_dim,
                                 bias=False)
        self.output = nn.Linear(config.embedding_dim, config.tgt_vocab_size)
        self.output.weight = self.tgt_embedding.weight  # weight tying (Press & Wolf 2017)

    # ---------------------------------------------------------------------------------------------
    # Encoder and one attentional decoder pass
    # ---------------------------------------------------------------------------------------------
    @torch.jit.export
    def encode(
        self, src: torch.Tensor, src_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the encoder.

        Shape:
            src: (B, S) int64 padded with PAD_ID; src_lengths: (B,) each in 1..S.
            output: memory (B, S, 2He), keys (B, S, K), mask (B, S) bool (True = real token),
            initial decoder state (S, B, Hd), S = 2 for an LSTM and 1 otherwise.
        """
        batch_size, max_len = src.shape
        embedded = self.dropout(self.src_embedding(src))  # (B, S, E)
        packed = pack_padded_sequence(embedded, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out = self.encoder(packed)[0]
        memory, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=max_len)  # (B, S, 2He)
        steps = torch.arange(max_len, device=src.device).view(1, max_len)
        mask = steps < src_lengths.to(src.device).view(batch_size, 1)  # (B, S)
        pooled = memory.sum(dim=1) / src_lengths.to(memory.dtype).to(src.device).view(batch_size, 1)
        state = self.decoder.state_from_flat(torch.tanh(self.init_state(pooled)))  # (S, B, Hd)
        keys = self.memory_key(memory)  # (B, S, K)
        return memory, keys, mask, state

    def _attend(
        self, outputs: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the encoder states for every decoder output.

        Shape:
            outputs (B, T, Hd), memory (B, S, 2He), keys (B, S, K), mask (B, S).
            output: logits (B, T, V), attention weights (B, T, S) (zero on padding).
        """
        if self.additive:
            query = self.query(outputs)  # (B, T, A)
            scores = self.energy(torch.tanh(query.unsqueeze(2) + keys.unsqueeze(1))).squeeze(3)  # (B, T, S)
        else:
            scores = torch.bmm(outputs, keys.transpose(1, 2))  # (B, T, S)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=2)  # (B, T, S)
        context = torch.bmm(weights, memory)  # (B, T, 2He)
        attentional = torch.tanh(self.combine(torch.cat([context, outputs], dim=2)))  # (B, T, E)
        logits = self.output(self.dropout(attentional))  # (B, T, V)
        return logits, weights

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits.

        Shape:
            src: (B, S), src_lengths: (B,), tgt_in: (B, T) starting with BOS_ID, padded with PAD_ID.
            output: logits (B, T, V) for the next token at every position.
        """
        memory, keys, mask, state = self.encode(src, src_lengths)
        embedded = self.dropout(self.tgt_embedding(tgt_in))  # (B, T, E)
        outputs, _ = self.decoder(embedded, state)  # (B, T, Hd)
        logits, _ = self._attend(outputs, memory, keys, mask)
        return logits

    @torch.jit.export
    def decode_step(
        self, tokens: torch.Tensor, state: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder step for a batch of previous tokens.

        Shape:
            tokens: (B,) int64, state: (S, B, Hd), memory/keys/mask as from ``encode``.
            output: log-probabilities (B, V), new state (S, B, Hd), attention (B, S).
        """
        embedded = self.tgt_embedding(tokens).unsqueeze(1)  # (B, 1, E)
        outputs, state = self.decoder(embedded, state)  # (B, 1, Hd)
        logits, weights = self._attend(outputs, memory, keys, mask)
        return torch.log_softmax(logits.squeeze(1), dim=1), state, weights.squeeze(1)

    def _limit(self, max_length: int) -> int:
        if max_length < 1:
            return 1
        return min(max_length, self.max_output_length)

    # ---------------------------------------------------------------------------------------------
    # Decoding
    # ---------------------------------------------------------------------------------------------
    @torch.jit.export
    def greedy(
        self, src: torch.Tensor, src_lengths: torch.Tensor, max_length: int, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched greedy decoding; stops at EOS or after ``min(max_length, max_output_length)`` tokens.

        Shape:
            src: (B, S), src_lengths: (B,).
            output: tokens (B, L) int64 padded with PAD_ID (EOS excluded), lengths (B,), log-prob
            scores (B,), steps taken () int64, attention (B, L, S) (empty (B, 0, S) unless requested).
        """
        batch_size = src.shape[0]
        limit = self._limit(max_length)
        memory, keys, mask, state = self.encode(src, src_lengths)
        previous = torch.full((batch_size,), self.bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=src.device)
        lengths = torch.zeros(batch_size, dtype=torch.long, device=src.device)
        scores = torch.zeros(batch_size, dtype=memory.dtype, device=src.device)
        tokens: list[torch.Tensor] = []
        attention: list[torch.Tensor] = []
        steps = 0
        for _ in range(limit):  # a sentence still unfinished after ``limit`` tokens is cut there
            log_probs, state, weights = self.decode_step(previous, state, memory, keys, mask)
            steps += 1
            best_scores, best = log_probs.max(dim=1)  # (B,)
            scores = scores + best_scores.masked_fill(finished, 0.0)
            best = best.masked_fill(finished, self.pad_id)
            ended = (best == self.eos_id) & ~finished
            lengths = lengths + (~finished & ~ended).long()
            finished = finished | ended
            tokens.append(best.masked_fill(best == self.eos_id, self.pad_id))
            if return_attention:
                attention.append(weights)
            previous = best
            if bool(finished.all()):
                break
        out = self._stack_tokens(tokens, lengths, batch_size, src.device)
        return out, lengths, scores, torch.tensor(steps), self._stack_attention(
            attention, return_attention, out.shape[1], lengths, batch_size, memory.shape[1], memory.dtype,
            src.device)

    def _stack_tokens(
        self, tokens: list[torch.Tensor], lengths: torch.Tensor, batch_size: int, device: torch.device
    ) -> torch.Tensor:
        width = int(lengths.max()) if batch_size > 0 else 0
        if width == 0 or len(tokens) == 0:
            return torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return torch.stack(tokens, dim=1)[:, :width]  # (B, L)

    def _stack_attention(
        self, attention: list[torch.Tensor], requested: bool, width: int, lengths: torch.Tensor,
        batch_size: int, src_len: int, dtype: torch.dtype, device: torch.device,
    ) -> torch.Tensor:
        if not requested or width == 0 or len(attention) == 0:
            return torch.zeros(batch_size, 0, src_len, dtype=dtype, device=device)
        stacked = torch.stack(attention, dim=1)[:, :width]  # (B, L, S)
        valid = torch.arange(width, device=device).view(1, width) < lengths.view(batch_size, 1)
        return stacked.masked_fill(~valid.unsqueeze(2), 0.0)

    @torch.jit.export
    def beam_search(
        self, src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int, max_length: int,
        length_penalty: float = 1.0, return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched beam search: ``beam_size`` hypotheses per sentence, decoded as one (B*K) batch.

        Finished hypotheses keep their slot and their score (they extend only with padding at zero
        cost), so the search ends when every slot of every sentence has emitted EOS, or at the length
        cap. The returned hypothesis maximises ``log p / length_norm`` with GNMT's normaliser
        ``((5 + |y|) / 6) ** length_penalty`` (Wu et al. 2016); ``length_penalty = 0`` ranks by raw
        log-probability. With ``beam_size == 1`` this is exactly greedy decoding.

        Shape:
            src: (B, S), src_lengths: (B,).
            output: as ``greedy``: tokens (B, L), lengths (B,), raw log-prob scores (B,), steps (),
            attention (B, L, S) (empty unless requested).
        """
        batch_size, src_len = src.shape
        beam = max(1, beam_size)
        limit = self._limit(max_length)
        device = src.device
        memory, keys, mask, state = self.encode(src, src_lengths)
        # Every hypothesis of a sentence shares its encoding: (B, ...) -> (B*K, ...).
        memory = memory.repeat_interleave(beam, dim=0)
        keys = keys.repeat_interleave(beam, dim=0)
        mask = mask.repeat_interleave(beam, dim=0)
        state = state.repeat_interleave(beam, dim=1)
        flat = batch_size * beam
        previous = torch.full((flat,), self.bos_id, dtype=torch.long, device=device)
        # Only the first slot is live at the start, so step one does not pick K copies of one token.
        scores = torch.full((batch_size, beam), float("-inf"), dtype=memory.dtype, device=device)
        scores[:, 0] = 0.0
        finished = torch.zeros(flat, dtype=torch.bool, device=device)
        lengths = torch.zeros(flat, dtype=torch.long, device=device)
        history = torch.zeros(flat, 0, dtype=torch.long, device=device)  # (B*K, t)
        attention = torch.zeros(flat, 0, src_len, dtype=memory.dtype, device=device)  # (B*K, t, S)
        offsets = (torch.arange(batch_size, device=device) * beam).view(batch_size, 1)  # (B, 1)
        steps = 0
        for _ in range(limit):  # hypotheses still live after ``limit`` tokens are cut there
            log_probs, state, weights = self.decode_step(previous, state, memory, keys, mask)  # (B*K, V)
            steps += 1
            vocab = log_probs.shape[1]
            # A finished hypothesis may only continue with PAD, at no cost.
            finished_row = torch.full((vocab,), float("-inf"), dtype=log_probs.dtype, device=device)
            finished_row[self.pad_id] = 0.0
            log_probs = torch.where(finished.unsqueeze(1), finished_row.unsqueeze(0), log_probs)
            candidates = scores.view(flat, 1) + log_probs  # (B*K, V)
            top_scores, top_index = candidates.view(batch_size, beam * vocab).topk(beam, dim=1)  # (B, K)
            origin = torch.div(top_index, vocab, rounding_mode="floor")  # (B, K) parent slot
            token = top_index % vocab  # (B, K)
            parent = (origin + offsets).view(flat)  # (B*K,) rows of the previous step
            token = token.view(flat)
            was_finished = finished.index_select(0, parent)
            ended = (token == self.eos_id) & ~was_finished
            lengths = lengths.index_select(0, parent) + (~was_finished & ~ended).long()
            finished = was_finished | ended
            scores = top_scores
            emitted = token.masked_fill(token == self.eos_id, self.pad_id)
            history = torch.cat([history.index_select(0, parent), emitted.unsqueeze(1)], dim=1)
            if return_attention:
                attention = torch.cat(
                    [attention.index_select(0, parent), weights.index_select(0, parent).unsqueeze(1)], dim=1)
            state = state.index_select(1, parent)
            previous = token
            if bool(finished.all()):
                break
        # Pick, per sentence, the slot with the best length-normalised score.
        norm = ((5.0 + lengths.view(batch_size, beam).to(scores.dtype)) / 6.0) ** length_penalty
        best_slot = (scores / norm).argmax(dim=1)  # (B,)
        rows = best_slot + offsets.view(batch_size)  # (B,)
        best_lengths = lengths.index_select(0, rows)
        best_scores = scores.view(flat).index_select(0, rows)
        width = int(best_lengths.max()) if batch_size > 0 else 0
        tokens = history.index_select(0, rows)[:, :width]  # (B, L)
        if return_attention and width > 0:
            picked = attention.index_select(0, rows)[:, :width]  # (B, L, S)
            valid = torch.arange(width, device=device).view(1, width) < best_lengths.view(batch_size, 1)
            picked = picked.masked_fill(~valid.unsqueeze(2), 0.0)
        else:
            picked = torch.zeros(batch_size, 0, src_len, dtype=memory.dtype, device=device)
        return tokens, best_lengths, best_scores, torch.tensor(steps), picked
