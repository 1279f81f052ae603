"""SAMI loss and MI metrics: worked numbers, properties, and a loop-based reference."""

from __future__ import annotations

import math

import pytest
import torch

from sami_worker.objective import mean_and_stderr, plugin_mi, sami_loss


def naive_sami_loss(matrix: list[list[float]]) -> tuple[float, float]:
    """(loss_row, loss_col) written as docs/method.md's formulas, with plain loops."""
    c = len(matrix)

    def neg_log_softmax_at(values: list[float], index: int) -> float:
        top = max(values)
        log_sum = top + math.log(sum(math.exp(v - top) for v in values))
        return log_sum - values[index]

    row = sum(neg_log_softmax_at(matrix[i], i) for i in range(c)) / c
    col = sum(neg_log_softmax_at([matrix[i][j] for i in range(c)], j) for j in range(c)) / c
    return row, col


def test_worked_two_by_two():
    # Rows constitutions, columns responses; L[i, j] = mean log-prob of y_j under c_i.
    matrix = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    out = sami_loss(matrix)
    # Row 0 softmax over (-1, -3), own -1:  -log_softmax = log(1 + e^-2) = 0.126928
    # Row 1 softmax over (-2, -2), own -2:  -log_softmax = log 2         = 0.693147
    loss_row = (math.log(1 + math.exp(-2)) + math.log(2)) / 2  # 0.410038
    # Column 0 over (-1, -2), own -1: log(1 + e^-1) = 0.313262
    # Column 1 over (-3, -2), own -2: log(1 + e^-1) = 0.313262
    loss_col = math.log(1 + math.exp(-1))  # 0.313262
    assert out.loss_row.item() == pytest.approx(loss_row, abs=1e-6)
    assert out.loss_row.item() == pytest.approx(0.410038, abs=1e-6)
    assert out.loss_col.item() == pytest.approx(0.313262, abs=1e-6)
    assert out.loss.item() == pytest.approx((loss_row + loss_col) / 2, abs=1e-6)  # 0.361650
    assert out.mi_lower_bound.item() == pytest.approx(math.log(2) - loss_col, abs=1e-6)  # 0.379885
    # Own entry strictly largest: row 0 yes, row 1 tie (no), column 0 yes, column 1 yes.
    assert out.accuracy.item() == pytest.approx(3 / 4)
    assert out.block_loss.shape == (1,)


@pytest.mark.parametrize("c", [2, 3, 5])
def test_uniform_matrix_is_chance(c):
    out = sami_loss(torch.full((c, c), -2.5))
    assert out.loss.item() == pytest.approx(math.log(c), abs=1e-6)
    assert out.loss_row.item() == pytest.approx(math.log(c), abs=1e-6)
    assert out.mi_lower_bound.item() == pytest.approx(0.0, abs=1e-6)
    assert out.accuracy.item() == 0.0


@pytest.mark.parametrize("c", [2, 4])
def test_strongly_diagonal_matrix_saturates_the_bound(c):
    matrix = 100.0 * torch.eye(c) - 50.0
    out = sami_loss(matrix)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert out.mi_lower_bound.item() == pytest.approx(math.log(c), abs=1e-6)
    assert out.accuracy.item() == 1.0


def test_invariant_to_permuting_constitutions_and_responses_together():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(5, 5, generator=generator)
    perm = torch.randperm(5, generator=generator)
    base, permuted = sami_loss(matrix), sami_loss(matrix[perm][:, perm])
    for name in ("loss", "loss_row", "loss_col", "mi_lower_bound", "accuracy"):
        assert getattr(permuted, name).item() == pytest.approx(getattr(base, name).item(), abs=1e-6)


def test_swapping_only_the_responses_changes_the_loss():
    matrix = torch.tensor([[-1.0, -3.0], [-2.0, -0.5]])
    assert sami_loss(matrix[:, [1, 0]]).loss.item() > sami_loss(matrix).loss.item() + 0.5


@pytest.mark.parametrize("c", [2, 3, 4, 5, 6])
def test_matches_loop_reference(c):
    generator = torch.Generator().manual_seed(c)
    matrix = torch.randn(c, c, generator=generator, dtype=torch.float64) * 3 - 4
    out = sami_loss(matrix)
    row, col = naive_sami_loss(matrix.tolist())
    assert out.loss_row.item() == pytest.approx(row, abs=1e-12)
    assert out.loss_col.item() == pytest.approx(col, abs=1e-12)
    assert out.loss.item() == pytest.approx((row + col) / 2, abs=1e-12)
    assert out.mi_lower_bound.item() == pytest.approx(math.log(c) - col, abs=1e-12)


def test_batched_equals_mean_of_blocks():
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randn(4, 3, 3, generator=generator)
    out = sami_loss(blocks)
    singles = [sami_loss(block) for block in blocks]
    assert out.block_loss.shape == (4,)
    for name in ("loss", "loss_row", "loss_col", "mi_lower_bound"):
        expected = sum(getattr(s, name).item() for s in singles) / 4
        assert getattr(out, name).item() == pytest.approx(expected, abs=1e-6)
    assert out.block_loss.tolist() == pytest.approx([s.loss.item() for s in singles], abs=1e-6)


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: sami_loss(m).loss, (matrix,))


def test_gradient_reaches_every_entry():
    matrix = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    sami_loss(matrix).loss.backward()
    assert (matrix.grad != 0).all()
    # Raising the own entries lowers the loss; raising the others raises it.
    assert (matrix.grad.diagonal() < 0).all()
    assert (matrix.grad[~torch.eye(3, dtype=torch.bool)] > 0).all()


def test_low_precision_input_is_upcast():
    out = sami_loss(torch.tensor([[-1.0, -3.0], [-2.0, -2.0]], dtype=torch.bfloat16))
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(0.361650, abs=1e-5)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (torch.zeros(2, 3), "square"),
        (torch.zeros(1, 1), "at least 2"),
        (torch.zeros(3), r"\(C, C\) or \(B, C, C\)"),
        (torch.zeros(1, 2, 2, 2), r"\(C, C\) or \(B, C, C\)"),
        (torch.zeros(2, 2, dtype=torch.long), "floating"),
        (torch.zeros(0, 2, 2), "no blocks"),
    ],
)
def test_rejects_bad_input(matrix, message):
    with pytest.raises(ValueError, match=message):
        sami_loss(matrix)


def test_plugin_mi_worked_example():
    # S[k, k'] = summed log-prob of response y_k' under constitution c_k.
    sums = torch.tensor([[-10.0, -14.0], [-12.0, -11.0]])
    # y_0: own -10, mean over constitutions (-10 - 12) / 2 = -11   -> 1.0
    # y_1: own -11, mean over constitutions (-14 - 11) / 2 = -12.5 -> 1.5
    assert plugin_mi(sums).item() == pytest.approx(1.25)
    assert plugin_mi(sums).shape == ()


def test_plugin_mi_is_unbounded_and_zero_at_chance():
    # Not capped at log K, unlike the InfoNCE bound: the paper plots values above log 4.
    sums = torch.full((4, 4), -50.0) + 20.0 * torch.eye(4)
    assert plugin_mi(sums).item() == pytest.approx(20.0 * 3 / 4)
    assert plugin_mi(torch.full((4, 4), -7.0)).item() == pytest.approx(0.0)


def test_plugin_mi_batched_is_per_item():
    sums = torch.stack([torch.tensor([[-10.0, -14.0], [-12.0, -11.0]]), torch.zeros(2, 2)])
    assert plugin_mi(sums).tolist() == pytest.approx([1.25, 0.0])


def test_mean_and_stderr():
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0, 6.0])
    # mean 3; sample variance (4 + 1 + 0 + 9) / 3 = 14/3; stderr sqrt(14/3) / 2
    assert mean == pytest.approx(3.0)
    assert stderr == pytest.approx(math.sqrt(14 / 3) / 2)
    assert math.isnan(mean_and_stderr([2.0])[1])
    with pytest.raises(ValueError, match="at least one"):
        mean_and_stderr([])
