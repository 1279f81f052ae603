"""Response log-probabilities and the C x C matrix they fill (SAMI.md, The objective).

Prompt and response are tokenised separately and joined as ids, so the boundary between them
is exact: the reference code joined strings and re-tokenised, which can move it. The caller
appends EOS to a response's ids when generation ended with EOS; EOS is then scored like any
other response token.

Index conventions: position t of a sequence predicts token t+1, so the log-prob of the response
token at position t is read from the model's output at position t-1 (the first response token
is predicted from the last prompt token). Rows pair (prompt index, response index). With
several query blocks in one batch, block b's constitution i is prompt b*C + i and its response
j is response b*C + j (see `block_pairs`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Batch:
    """Right-padded sequences prompt_ids[i] + response_ids[j], one row per pair (i, j)."""

    input_ids: Tensor  # (N, T) int64
    attention_mask: Tensor  # (N, T) int64, 1 on real tokens, 0 on padding
    response_mask: Tensor  # (N, T) bool, True where input_ids holds a response token
    pairs: tuple[tuple[int, int], ...]  # row n holds prompt pairs[n][0] + response pairs[n][1]


class ResponseLogprobs(NamedTuple):
    """Per-row totals over response tokens only."""

    sum: Tensor  # (N,) sum of token log-probs (the plug-in MI metric uses this)
    mean: Tensor  # (N,) sum / count (the training matrix uses this)
    count: Tensor  # (N,) int64 number of response tokens


def block_pairs(c: int, num_blocks: int = 1) -> list[tuple[int, int]]:
    """Every (constitution, response) pair of `num_blocks` query blocks, in the block layout."""
    if c < 1 or num_blocks < 1:
        raise ValueError(f"c and num_blocks must be at least 1; got c={c}, num_blocks={num_blocks}")
    return [(b * c + i, b * c + j) for b in range(num_blocks) for i in range(c) for j in range(c)]


def build_sequences(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pairs: Sequence[tuple[int, int]],
    pad_id: int,
) -> Batch:
    """One right-padded row per pair (i, j): prompt_ids[i] + response_ids[j], joined as ids."""
    if not pairs:
        raise ValueError("pairs is empty; need at least one (prompt index, response index)")
    for name, seqs in (("prompt_ids", prompt_ids), ("response_ids", response_ids)):
        for index, seq in enumerate(seqs):
            if len(seq) == 0:
                # An empty prompt leaves nothing to predict the first response token from; an
                # empty response has no tokens to score (filter_reason drops those upstream).
                raise ValueError(f"{name}[{index}] is empty; every sequence needs a token")
    for n, (i, j) in enumerate(pairs):
        if not (0 <= i < len(prompt_ids) and 0 <= j < len(response_ids)):
            raise ValueError(
                f"pairs[{n}] = ({i}, {j}) is out of range for {len(prompt_ids)} prompts and "
                f"{len(response_ids)} responses"
            )
    length = max(len(prompt_ids[i]) + len(response_ids[j]) for i, j in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    response_mask = torch.zeros((len(pairs), length), dtype=torch.bool)
    for n, (i, j) in enumerate(pairs):
        prompt, response = list(prompt_ids[i]), list(response_ids[j])
        end = len(prompt) + len(response)
        input_ids[n, :end] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[n, :end] = 1
        response_mask[n, len(prompt) : end] = True
    return Batch(input_ids, attention_mask, response_mask, tuple((i, j) for i, j in pairs))


def _check_ids_and_mask(input_ids: Tensor, response_mask: Tensor, leading: tuple[int, ...]) -> None:
    if input_ids.ndim != 2 or tuple(input_ids.shape) != leading:
        raise ValueError(
            f"input_ids must have shape (N, T) = {leading}; got {tuple(input_ids.shape)}"
        )
    if response_mask.dtype != torch.bool or tuple(response_mask.shape) != leading:
        raise ValueError(
            f"response_mask must be bool of shape (N, T) = {leading}; got "
            f"{response_mask.dtype} {tuple(response_mask.shape)}"
        )
    if response_mask[:, 0].any():
        raise ValueError("response_mask is True at position 0; a response needs a prompt before it")
    empty = (~response_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no response tokens; their mean log-prob is undefined")


def _totals(token_logprobs: Tensor, rows: Tensor, targets_mask: Tensor) -> ResponseLogprobs:
    n = targets_mask.shape[0]
    sums = token_logprobs.new_zeros(n).index_add(0, rows, token_logprobs)
    count = targets_mask.sum(dim=1)
    return ResponseLogprobs(sum=sums, mean=sums / count, count=count)


def _chunk_logprobs(hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return target_logits - logits.logsumexp(dim=1)


def response_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
) -> ResponseLogprobs:
    """Log-probs of the response tokens from final hidden states, without full-vocab logits.

    hidden: (N, T, H) final hidden states (after the final norm); lm_head_weight: (V, H) (the
    full weight; under FSDP the gathered one); bias: optional (V,); input_ids: (N, T);
    response_mask: (N, T) bool as in `Batch`.

    Only the R rows that predict a response token go through the LM head, chunk_size rows at
    a time; each (chunk_size, V) block of logits is upcast to float32 for the logsumexp. With
    gradients on, each chunk is checkpointed, so backward recomputes its logits instead of
    keeping R x V float32 logits alive: peak extra memory is one chunk, not the batch.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape (N, T, H); got {tuple(hidden.shape)}")
    n, t, h = hidden.shape
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != h:
        raise ValueError(
            f"lm_head_weight must have shape (V, H) with H = {h}; got {tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape (V,) = ({vocab},); got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1; got {chunk_size}")
    _check_ids_and_mask(input_ids, response_mask, (n, t))

    targets_mask = response_mask[:, 1:]  # (N, T-1): output at t predicts token t+1
    rows = targets_mask.nonzero()[:, 0]  # (R,) which sequence each predicted token belongs to
    predicting = hidden[:, :-1][targets_mask]  # (R, H)
    targets = input_ids[:, 1:][targets_mask]  # (R,)
    if targets.min() < 0 or targets.max() >= vocab:
        raise ValueError(f"response token ids must lie in [0, {vocab}); got ids outside it")

    use_checkpoint = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, lm_head_weight, bias)
    )
    pieces = []
    for start in range(0, predicting.shape[0], chunk_size):
        args = (predicting[start : start + chunk_size], targets[start : start + chunk_size])
        if use_checkpoint:
            pieces.append(
                checkpoint(_chunk_logprobs, *args, lm_head_weight, bias, use_reentrant=False)
            )
        else:
            pieces.append(_chunk_logprobs(*args, lm_head_weight, bias))
    return _totals(torch.cat(pieces), rows, targets_mask)


def response_logprobs_from_logits(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor
) -> ResponseLogprobs:
    """Reference path from full logits (N, T, V); materialises a float32 log-softmax."""
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (N, T, V); got {tuple(logits.shape)}")
    _check_ids_and_mask(input_ids, response_mask, tuple(logits.shape[:2]))
    targets_mask = response_mask[:, 1:]
    log_probs = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = log_probs.log_softmax(dim=-1)
    token_logprobs = log_probs.gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)
    rows = targets_mask.nonzero()[:, 0]
    return _totals(token_logprobs[targets_mask], rows, targets_mask)


def assemble_matrices(
    values: Tensor, pairs: Sequence[tuple[int, int]], c: int, num_blocks: int
) -> Tensor:
    """(num_blocks, C, C) matrices from one value per row, placed by its explicit pair.

    values: (N,); pairs[n] = (prompt index, response index) of row n in the block layout
    (block b's constitution i is b*C + i, its response j is b*C + j). Every entry of every
    block must be given exactly once; row order does not matter.
    """
    if values.ndim != 1 or values.shape[0] != len(pairs):
        raise ValueError(
            f"values must have shape (N,) with N = len(pairs) = {len(pairs)}; "
            f"got {tuple(values.shape)}"
        )
    if c < 2 or num_blocks < 1:
        raise ValueError(f"need c >= 2 and num_blocks >= 1; got c={c}, num_blocks={num_blocks}")
    flat_index = []
    for n, (i, j) in enumerate(pairs):
        if not (0 <= i < c * num_blocks and 0 <= j < c * num_blocks) or i // c != j // c:
            raise ValueError(
                f"pairs[{n}] = ({i}, {j}) is not a (constitution, response) pair of one of "
                f"{num_blocks} block(s) of C={c}"
            )
        flat_index.append((i // c) * c * c + (i % c) * c + (j % c))
    times = Counter(flat_index)
    duplicates = sorted({tuple(pairs[n]) for n, k in enumerate(flat_index) if times[k] > 1})
    if duplicates:
        raise ValueError(f"pairs {duplicates} appear more than once")
    if len(times) != num_blocks * c * c:
        missing = sorted(set(block_pairs(c, num_blocks)) - {tuple(p) for p in pairs})
        raise ValueError(f"pairs {missing} are missing; every block needs all C x C pairs")
    index = torch.tensor(flat_index, dtype=torch.long, device=values.device)
    flat = values.new_zeros(num_blocks * c * c).index_copy(0, index, values)
    return flat.view(num_blocks, c, c)


def assemble_matrix(values: Tensor, pairs: Sequence[tuple[int, int]], c: int) -> Tensor:
    """The (C, C) matrix of one query block; see `assemble_matrices`."""
    return assemble_matrices(values, pairs, c, num_blocks=1)[0]
