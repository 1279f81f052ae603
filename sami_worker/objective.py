"""The SAMI objective and its mutual-information metrics (docs/method.md, 'The objective' and
'Mutual-information estimates').

Convention everywhere in this module: a matrix M has rows = constitutions i and columns =
responses j, where response j was generated under constitution j, so the diagonal holds the
"own" pairs. M[i, j] scores response y_j under constitution c_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class SamiLoss(NamedTuple):
    """The loss and its parts. Scalars average over query blocks; block_* keep one per block."""

    loss: Tensor  # () (loss_row + loss_col) / 2; log C at chance
    loss_row: Tensor  # () given c_i, pick y_i among the responses
    loss_col: Tensor  # () given y_j, pick c_j among the constitutions
    mi_lower_bound: Tensor  # () InfoNCE bound log C - loss_col, in nats, at most log C
    accuracy: Tensor  # () share of rows and columns whose own entry is the strict maximum
    block_loss: Tensor  # (B,)
    block_mi_lower_bound: Tensor  # (B,)


def _as_blocks(matrix: Tensor, name: str) -> tuple[Tensor, bool]:
    """(B, C, C) view of a (C, C) or (B, C, C) matrix, promoted to at least float32."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(matrix).__name__}")
    if not matrix.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype; got {matrix.dtype}")
    if matrix.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (C, C) or (B, C, C); got {tuple(matrix.shape)}")
    blocks = matrix if matrix.ndim == 3 else matrix.unsqueeze(0)
    b, rows, cols = blocks.shape
    if rows != cols:
        raise ValueError(
            f"{name} must be square (constitutions x responses); got {tuple(matrix.shape)}"
        )
    if rows < 2:
        raise ValueError(f"{name} needs at least 2 constitutions; got shape {tuple(matrix.shape)}")
    if b == 0:
        raise ValueError(f"{name} holds no blocks; got shape {tuple(matrix.shape)}")
    # bf16/fp16 log-probs lose the small differences between entries that the softmax reads.
    blocks = blocks.to(torch.promote_types(blocks.dtype, torch.float32))
    return blocks, matrix.ndim == 2


def sami_loss(logprobs: Tensor) -> SamiLoss:
    """SAMI's symmetric contrastive loss on one or more query blocks.

    logprobs: (C, C) or (B, C, C). Entry [b, i, j] = MEAN token log-prob of response y_j under
    constitution c_i (same query b). C >= 2. Computed in at least float32.

        loss_row = mean_i -log softmax_j(L[i, :])[i]
        loss_col = mean_j -log softmax_i(L[:, j])[j]
        loss     = (loss_row + loss_col) / 2

    No temperature and no KL term: every reported run used neither (docs/method.md, 'Where we
    differ from the reference code'). Gradients flow through every entry. With B blocks the
    scalars are means over blocks.
    """
    blocks, _ = _as_blocks(logprobs, "logprobs")
    c = blocks.shape[-1]
    # log_softmax over dim 2 normalises each row over responses; over dim 1 each column over
    # constitutions. Their diagonals are the own-pair log-probabilities.
    own_given_constitution = blocks.log_softmax(dim=2).diagonal(dim1=1, dim2=2)  # (B, C)
    own_given_response = blocks.log_softmax(dim=1).diagonal(dim1=1, dim2=2)  # (B, C)
    block_row = -own_given_constitution.mean(dim=1)
    block_col = -own_given_response.mean(dim=1)
    block_loss = (block_row + block_col) / 2
    block_mi = math.log(c) - block_col

    with torch.no_grad():
        diagonal = blocks.diagonal(dim1=1, dim2=2)  # (B, C)
        off = blocks.masked_fill(torch.eye(c, dtype=torch.bool, device=blocks.device), -math.inf)
        row_hit = diagonal > off.amax(dim=2)
        col_hit = diagonal > off.amax(dim=1)
        accuracy = torch.cat([row_hit, col_hit], dim=1).to(blocks.dtype).mean()

    return SamiLoss(
        loss=block_loss.mean(),
        loss_row=block_row.mean(),
        loss_col=block_col.mean(),
        mi_lower_bound=block_mi.mean(),
        accuracy=accuracy,
        block_loss=block_loss,
        block_mi_lower_bound=block_mi,
    )


def plugin_mi(sum_logprobs: Tensor) -> Tensor:
    """The paper's plotted MI estimate (plug-in; not bounded by log K), per evaluation item.

    sum_logprobs: (K, K) or (N, K, K). Entry [n, k, k'] = SUM of the log-probs of response
    y_k' under constitution c_k (rows constitutions, columns responses, as in `sami_loss`).

        mi = mean_k [ S[k, k] - mean_k' S[k', k] ]

    i.e. for each response, its log-prob under its own constitution minus its mean log-prob
    over all K constitutions; equal to mean(diagonal) - mean(all entries).
    Returns a 0-dim tensor for (K, K), shape (N,) for (N, K, K); average with `mean_and_stderr`.
    """
    blocks, single = _as_blocks(sum_logprobs, "sum_logprobs")
    own = blocks.diagonal(dim1=1, dim2=2)  # (N, K): S[k, k]
    response_mean = blocks.mean(dim=1)  # (N, K): mean over constitutions k' of S[k', k]
    mi = (own - response_mean).mean(dim=1)
    return mi[0] if single else mi


def mean_and_stderr(values: Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof=1); stderr is nan for one value."""
    data = torch.as_tensor(values, dtype=torch.float64).flatten()
    if data.numel() == 0:
        raise ValueError("mean_and_stderr needs at least one value; got none")
    mean = data.mean().item()
    if data.numel() == 1:
        return mean, math.nan
    return mean, (data.std(correction=1) / math.sqrt(data.numel())).item()
