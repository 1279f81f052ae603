"""Response log-probabilities and the C x C matrix they fill (docs/method.md, 'The objective').

Prompt and response are tokenised separately and joined as ids, so the boundary between them
is exact: the reference code joined strings and re-tokenised, which can move it. The caller
appends EOS to a response's ids when generation ended with EOS; EOS is then scored like any
other response token.

Index conventions: position t of a sequence predicts token t+1, so the log-prob of the response
token at position t is read from the model's output at position t-1 (the first response token
is predicted from the last prompt token). Rows pair (prompt index, response index). With
several query blocks in one batch, block b's constitution i is prompt b*C + i and its response
j is response b*C + j (see `block_pairs`).

The training path is cheaper than the reference approach (full logits, a float32 log-softmax at
every position; benchmarks/training.py compares the two) in two exact ways: `share_prompts`
puts each distinct prompt through the model once with its responses packed behind it, and
`lm_head_logprobs` computes logits only at the positions that predict a response token, a
chunk of rows at a time, with a hand-written gradient instead of an autograd graph over them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


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


def _totals(token_logprobs: Tensor, rows: Tensor, count: Tensor) -> ResponseLogprobs:
    """Per-row sums and means of token log-probs; rows[i] is token i's row, count[r] the
    number of tokens of row r."""
    sums = token_logprobs.new_zeros(count.shape[0]).index_add(0, rows, token_logprobs)
    return ResponseLogprobs(sum=sums, mean=sums / count, count=count)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunk_softmax(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, probs: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Target log-probs (c,) and, if asked, the float32 softmax (c, V) of a chunk of rows.

    One (c, V) buffer and no other of its size: the logits (upcast to float32 when they are
    narrower), the targets' logits read from it, then turned in place into exp(logit - max),
    whose row sums give the log-normaliser as `torch.logsumexp` computes it, and into the
    softmax.
    """
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    logits = logits.to(_float_dtype(logits.dtype))
    target = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    peak = logits.amax(dim=1, keepdim=True)
    exp = logits.sub_(peak).exp_()
    total = exp.sum(dim=1, keepdim=True)
    logprob = target - (peak + total.log()).squeeze(1)
    return logprob, exp.div_(total) if probs else None


def _spans(rows: int, chunk_size: int, keep_rows: int) -> list[tuple[int, int, bool]]:
    """(start, end, keep) chunks: the first `keep_rows` rows kept, the rest recomputed."""
    keep_rows = min(keep_rows, rows)
    spans = [(s, min(s + chunk_size, keep_rows), True) for s in range(0, keep_rows, chunk_size)]
    spans += [(s, min(s + chunk_size, rows), False) for s in range(keep_rows, rows, chunk_size)]
    return spans


class _LMHeadLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per row, chunk by chunk, with its exact
    gradient and no (R, V) logits kept alive by autograd.

    Forward keeps the float32 softmax of the first `keep_rows` rows (chunks of the others are
    freed). Backward turns each chunk's softmax p into the gradient of the logits,
    g * (onehot(target) - p), in place (recomputing p for the chunks not kept), and
    accumulates the gradients of hidden, weight and bias from it. The gradient of the weight
    needs every row's p weighted by the upstream gradient of its row, which is known only in
    backward (the SAMI loss is not a sum of token terms), so a chunk not kept costs one more
    (c, H) x (H, V) product; a kept chunk costs (c, V) float32 memory from forward to backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, keep_rows):
        spans = _spans(hidden.shape[0], chunk_size, keep_rows)
        out = hidden.new_empty(hidden.shape[0], dtype=_float_dtype(hidden.dtype))
        kept = []
        for start, end, keep in spans:
            out[start:end], probs = _chunk_softmax(
                hidden[start:end], weight, bias, targets[start:end]
            )
            kept.append(probs if keep else None)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.spans, ctx.kept = spans, kept
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = hidden.new_empty(hidden.shape) if need_hidden else None
        grad_weight = grad_bias = None
        for k, (start, end, _) in enumerate(ctx.spans):
            rows, target = hidden[start:end], targets[start:end]
            probs, ctx.kept[k] = ctx.kept[k], None  # consumed: a second backward recomputes
            if probs is None:
                _, probs = _chunk_softmax(rows, weight, bias, target)
            g = grad_out[start:end].to(probs.dtype).unsqueeze(1)
            # d logprob / d logits = onehot(target) - softmax, times the upstream gradient.
            grad_logits = probs.mul_(-g).scatter_add_(1, target.unsqueeze(1), g)
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if need_weight:
                if grad_weight is None:
                    grad_weight = grad_logits.T @ rows
                else:
                    grad_weight.addmm_(grad_logits.T, rows)
            if need_bias:
                part = grad_logits.sum(dim=0)
                grad_bias = part if grad_bias is None else grad_bias.add_(part)
            del probs, grad_logits
        return grad_hidden, grad_weight, grad_bias, None, None, None


def lm_head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    keep_rows: int | None = None,
) -> Tensor:
    """log softmax(hidden @ weight.T + bias)[targets] for each of R rows, in float32 (or wider).

    hidden: (R, H); weight: (V, H); bias: optional (V,); targets: (R,) ids in [0, V).
    Logits exist only chunk_size rows at a time. With gradients on, the float32 softmax of the
    first `keep_rows` rows is kept for backward and the other chunks are recomputed there (see
    `_LMHeadLogprobs`). keep_rows=None keeps as many rows as fit in the memory of the weight
    itself (H * weight.element_size() / 4 rows), so the extra memory of this path is at most
    about twice the weight (its gradient and the kept rows) plus one chunk, whatever R is.
    """
    if keep_rows is None:
        keep_rows = hidden.shape[1] * weight.element_size() // 4
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias)
    )
    if wants_grad:
        return _LMHeadLogprobs.apply(hidden, weight, bias, targets, chunk_size, keep_rows)
    pieces = [
        _chunk_softmax(hidden[s:e], weight, bias, targets[s:e], probs=False)[0]
        for s, e, _ in _spans(hidden.shape[0], chunk_size, 0)
    ]
    return torch.cat(pieces) if pieces else hidden.new_empty(0, dtype=_float_dtype(hidden.dtype))


def _check_head(width: int, lm_head_weight: Tensor, bias: Tensor | None) -> None:
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != width:
        raise ValueError(
            f"lm_head_weight must have shape (V, H) with H = {width}; got "
            f"{tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape (V,) = ({vocab},); got {tuple(bias.shape)}")


def _check_targets(targets: Tensor, vocab: int) -> None:
    if targets.min() < 0 or targets.max() >= vocab:
        raise ValueError(f"response token ids must lie in [0, {vocab}); got ids outside it")


def response_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    keep_rows: int | None = None,
) -> ResponseLogprobs:
    """Log-probs of the response tokens from final hidden states, without full-vocab logits.

    hidden: (N, T, H) final hidden states (after the final norm); lm_head_weight: (V, H) (the
    full weight; under FSDP the gathered one); bias: optional (V,); input_ids: (N, T);
    response_mask: (N, T) bool as in `Batch`.

    Only the R rows that predict a response token go through the LM head (prompt and padding
    positions need no logits), chunk_size rows at a time, each (chunk_size, V) block of logits
    upcast to float32; see `lm_head_logprobs` for the gradient and `keep_rows`.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape (N, T, H); got {tuple(hidden.shape)}")
    n, t, h = hidden.shape
    _check_head(h, lm_head_weight, bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1; got {chunk_size}")
    _check_ids_and_mask(input_ids, response_mask, (n, t))

    targets_mask = response_mask[:, 1:]  # (N, T-1): output at t predicts token t+1
    rows = targets_mask.nonzero()[:, 0]  # (R,) which sequence each predicted token belongs to
    predicting = hidden[:, :-1][targets_mask]  # (R, H)
    targets = input_ids[:, 1:][targets_mask]  # (R,)
    _check_targets(targets, lm_head_weight.shape[0])
    token_logprobs = lm_head_logprobs(
        predicting, lm_head_weight, targets, bias, chunk_size, keep_rows
    )
    return _totals(token_logprobs, rows, targets_mask.sum(dim=1))


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
    return _totals(token_logprobs[targets_mask], rows, targets_mask.sum(dim=1))


@dataclass(frozen=True)
class SharedPrompts:
    """A batch with each distinct prompt computed once: one row per prompt, holding the prompt
    followed by every response it is paired with (see `share_prompts`)."""

    input_ids: Tensor  # (G, L) int64, right-padded
    position_ids: Tensor  # (G, L) int64: a response's positions continue from its prompt's
    segments: Tensor  # (G, L) int64: 0 prompt, s + 1 the row's s-th response, -1 padding
    predict: Tensor  # (R,) flat index g * L + t of the output that predicts each response token
    targets: Tensor  # (R,) the response tokens, row by row as in the padded batch
    rows: Tensor  # (R,) the padded batch's row each response token belongs to
    count: Tensor  # (N,) int64 response tokens per padded row

    def attention_mask(self, dtype: torch.dtype | None = None) -> Tensor:
        """(G, 1, L, L) mask for the model: a token sees its own prompt's tokens up to itself
        and, in a response, that response's tokens up to itself; padding sees itself only
        (so no softmax row is empty). Boolean (True = attend), or additive in `dtype` (0 or
        the most negative value) for eager attention."""
        seg = self.segments
        length = seg.shape[1]
        index = torch.arange(length, device=seg.device)
        causal = index.unsqueeze(0) <= index.unsqueeze(1)  # [query, key]
        same = (seg.unsqueeze(1) == 0) | (seg.unsqueeze(1) == seg.unsqueeze(2))
        own = index.unsqueeze(0) == index.unsqueeze(1)
        allowed = torch.where((seg < 0).unsqueeze(2), own, causal & same).unsqueeze(1)
        if dtype is None:
            return allowed
        zero = torch.zeros((), dtype=dtype, device=seg.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)


def share_prompts(
    input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, width: int | None = None
) -> SharedPrompts | None:
    """Repack a right-padded batch (as `build_sequences` makes) so each distinct prompt is
    computed once; None when there is nothing to gain or the batch has another layout.

    In a SAMI block every prompt is paired with all C responses, so the C x C sequences repeat
    each prompt C times. A causal model's outputs at prompt positions do not depend on what
    follows, so one row per prompt, prompt + response_1 + ... + response_k, with an attention
    mask that lets each response see only the prompt and itself and position ids that restart
    where the prompt ends, gives every response token exactly the output it has in its own
    sequence (same keys, same positions, same values) while the prompt is computed once. For
    C = 2 with 150-token prompts and 100-token responses that is 700 tokens instead of 1000.

    Rows are grouped by their prompt's token ids (equal ids give equal outputs), so any set of
    pairs works. The packed rows are longer, and masked attention over them costs length
    squared; with `width` (the model's hidden size) the repacking is used only when an estimate
    of the cost, rows * length * (6 * width + length), is lower than for the padded batch.
    """
    _check_ids_and_mask(input_ids, response_mask, tuple(attention_mask.shape))
    ids, real, response = (x.cpu() for x in (input_ids, attention_mask.bool(), response_mask))
    n, t = ids.shape
    lengths = real.sum(dim=1)
    starts = response.int().argmax(dim=1)  # first response position of each row
    index = torch.arange(t)
    right_padded = real == (index < lengths.unsqueeze(1))
    contiguous = response == ((index >= starts.unsqueeze(1)) & (index < lengths.unsqueeze(1)))
    if not bool(right_padded.all() and contiguous.all()):
        return None

    groups: dict[tuple[int, ...], list[int]] = {}
    for row, (seq, start) in enumerate(zip(ids.tolist(), starts.tolist(), strict=True)):
        groups.setdefault(tuple(seq[:start]), []).append(row)
    lengths_list = lengths.tolist()
    packed_lengths = [
        len(prompt) + sum(lengths_list[r] - len(prompt) for r in rows)
        for prompt, rows in groups.items()
    ]
    g, length = len(groups), max(packed_lengths)
    if g == n:
        return None  # no prompt is shared
    if width is not None and g * length * (6 * width + length) >= n * t * (6 * width + t):
        return None

    packed = torch.zeros(g, length, dtype=torch.long)
    positions = torch.zeros(g, length, dtype=torch.long)
    segments = torch.full((g, length), -1, dtype=torch.long)
    predict = [None] * n
    for k, (prompt, rows) in enumerate(groups.items()):
        p = len(prompt)
        packed[k, :p] = torch.tensor(prompt, dtype=torch.long)
        positions[k, :p] = torch.arange(p)
        segments[k, :p] = 0
        offset = p
        for s, row in enumerate(rows):
            r = lengths_list[row] - p
            packed[k, offset : offset + r] = ids[row, p : p + r]
            positions[k, offset : offset + r] = torch.arange(p, p + r)
            segments[k, offset : offset + r] = s + 1
            # The first response token is predicted by the prompt's last output, the others
            # by the response's own previous token.
            predict[row] = [k * length + p - 1] + list(
                range(k * length + offset, k * length + offset + r - 1)
            )
            offset += r
    targets_mask = response[:, 1:]
    device = input_ids.device
    return SharedPrompts(
        input_ids=packed.to(device),
        position_ids=positions.to(device),
        segments=segments.to(device),
        predict=torch.tensor([i for row in predict for i in row], device=device),
        targets=input_ids[:, 1:][targets_mask.to(device)],
        rows=targets_mask.nonzero()[:, 0].to(device),
        count=targets_mask.sum(dim=1).to(device),
    )


def shared_prompt_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    packed: SharedPrompts,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    keep_rows: int | None = None,
) -> ResponseLogprobs:
    """`response_logprobs` for a batch repacked by `share_prompts`: hidden (G, L, H) are the
    model's final hidden states for `packed.input_ids`; the totals are per padded-batch row."""
    g, length = packed.input_ids.shape
    if hidden.ndim != 3 or tuple(hidden.shape[:2]) != (g, length):
        raise ValueError(f"hidden must have shape ({g}, {length}, H); got {tuple(hidden.shape)}")
    _check_head(hidden.shape[2], lm_head_weight, bias)
    _check_targets(packed.targets, lm_head_weight.shape[0])
    predicting = hidden.reshape(g * length, -1).index_select(0, packed.predict)
    token_logprobs = lm_head_logprobs(
        predicting, lm_head_weight, packed.targets, bias, chunk_size, keep_rows
    )
    return _totals(token_logprobs, packed.rows, packed.count)


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
