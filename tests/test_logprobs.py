"""Sequence assembly, response log-probs and the C x C matrix."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sami_worker.logprobs import (
    assemble_matrices,
    assemble_matrix,
    block_pairs,
    build_sequences,
    lm_head_logprobs,
    response_logprobs,
    response_logprobs_from_logits,
    share_prompts,
    shared_prompt_logprobs,
)

PAD = 0


def test_build_sequences_joins_ids_and_masks_exactly():
    batch = build_sequences([[5, 6, 7], [9]], [[11, 12], [13]], [(0, 0), (1, 1), (0, 1)], PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 11, 12], [9, 13, 0, 0, 0], [5, 6, 7, 13, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert batch.response_mask.int().tolist() == [
        [0, 0, 0, 1, 1],
        [0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0],
    ]
    assert batch.pairs == ((0, 0), (1, 1), (0, 1))


@pytest.mark.parametrize(
    ("prompts", "responses", "pairs", "message"),
    [
        ([[1]], [[2]], [(1, 0)], "out of range"),
        ([[1]], [[2]], [(0, -1)], "out of range"),
        ([[]], [[2]], [(0, 0)], r"prompt_ids\[0\] is empty"),
        ([[1]], [[]], [(0, 0)], r"response_ids\[0\] is empty"),
        ([[1]], [[2]], [], "pairs is empty"),
    ],
)
def test_build_sequences_rejects_bad_input(prompts, responses, pairs, message):
    with pytest.raises(ValueError, match=message):
        build_sequences(prompts, responses, pairs, PAD)


def test_first_response_token_is_predicted_from_last_prompt_token():
    # prompt [1, 2], response [3, 4] (EOS appended by the caller would be scored the same way).
    batch = build_sequences([[1, 2]], [[3, 4]], [(0, 0)], PAD)  # row [1, 2, 3, 4]
    vocab = 6
    logits = torch.zeros(1, 4, vocab)
    logits[0, 1, 3] = 2.0  # output at position 1 (token 2) predicts token 3
    logits[0, 2, 4] = 1.0  # output at position 2 (token 3) predicts token 4
    out = response_logprobs_from_logits(logits, batch.input_ids, batch.response_mask)
    first = 2.0 - math.log(math.exp(2.0) + vocab - 1)
    second = 1.0 - math.log(math.exp(1.0) + vocab - 1)
    assert out.count.tolist() == [2]
    assert out.sum.item() == pytest.approx(first + second, abs=1e-6)
    assert out.mean.item() == pytest.approx((first + second) / 2, abs=1e-6)

    # The outputs at the prompt's first token and at the last token predict nothing scored.
    logits[0, 0] = torch.randn(vocab)
    logits[0, 3] = torch.randn(vocab)
    again = response_logprobs_from_logits(logits, batch.input_ids, batch.response_mask)
    assert again.sum.item() == pytest.approx(out.sum.item(), abs=1e-6)


def test_padding_is_ignored():
    batch = build_sequences([[1, 2, 3], [1]], [[4], [5]], [(0, 0), (1, 1)], PAD)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, batch.input_ids.shape[1], 7, generator=generator)
    out = response_logprobs_from_logits(logits, batch.input_ids, batch.response_mask)
    # Row 1 is [1, 5, pad, pad]: change padded logits and pad ids; nothing moves.
    logits[1, 2:] = 100.0 * torch.randn(2, 7, generator=generator)
    ids = batch.input_ids.clone()
    ids[1, 2:] = 6
    again = response_logprobs_from_logits(logits, ids, batch.response_mask)
    assert again.sum.tolist() == pytest.approx(out.sum.tolist(), abs=1e-6)
    assert out.count.tolist() == [1, 1]


def random_case(dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    vocab, width = 23, 8
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    responses = [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 7))] for _ in range(3)]
    batch = build_sequences(prompts, responses, block_pairs(3), PAD)
    n, t = batch.input_ids.shape
    hidden = torch.randn(n, t, width, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, generator=generator, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, generator=generator, dtype=dtype, requires_grad=True)
    return batch, hidden, weight, bias


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 10_000])
@pytest.mark.parametrize("keep_rows", [0, 6, None])  # recompute all, some, keep all (small R)
def test_efficient_path_matches_logits_path(dtype, tolerance, chunk_size, keep_rows):
    batch, hidden, weight, bias = random_case(dtype, seed=chunk_size)
    fast = response_logprobs(
        hidden,
        weight,
        batch.input_ids,
        batch.response_mask,
        chunk_size=chunk_size,
        bias=bias,
        keep_rows=keep_rows,
    )
    slow = response_logprobs_from_logits(
        hidden @ weight.T + bias, batch.input_ids, batch.response_mask
    )
    assert fast.count.tolist() == slow.count.tolist()
    assert torch.allclose(fast.sum, slow.sum, atol=tolerance, rtol=tolerance)
    assert torch.allclose(fast.mean, slow.mean, atol=tolerance, rtol=tolerance)

    # Same gradients, from kept and from recomputed chunks.
    fast_grads = torch.autograd.grad(fast.mean.sum(), (hidden, weight, bias))
    slow_grads = torch.autograd.grad(slow.mean.sum(), (hidden, weight, bias))
    for got, expected in zip(fast_grads, slow_grads, strict=True):
        assert torch.allclose(got, expected, atol=tolerance, rtol=tolerance)


def test_gradients_flow_to_hidden_and_weight():
    batch, hidden, weight, _ = random_case(torch.float32, seed=3)
    out = response_logprobs(hidden, weight, batch.input_ids, batch.response_mask, chunk_size=4)
    out.mean.sum().backward()
    assert hidden.grad is not None and weight.grad is not None
    assert weight.grad.abs().sum() > 0
    # Only outputs that predict a response token get a gradient.
    predicts = torch.zeros_like(batch.response_mask)
    predicts[:, :-1] = batch.response_mask[:, 1:]
    assert (hidden.grad.abs().sum(-1) > 0).eq(predicts).all()


@pytest.mark.parametrize("keep_rows", [0, 3, None])
def test_lm_head_gradient_is_exact_and_repeatable(keep_rows):
    """The fused gradient equals autograd's through a float32 log-softmax, for hidden, weight
    and bias alone or together; a second backward (retain_graph) recomputes what the first one
    consumed and gives the same gradients."""
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(9, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(23, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(23, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 23, (9,), generator=generator)
    upstream = torch.randn(9, generator=generator, dtype=torch.float64)
    plain = (hidden @ weight.T + bias).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    expected = torch.autograd.grad((plain * upstream).sum(), (hidden, weight, bias))
    out = lm_head_logprobs(hidden, weight, targets, bias, chunk_size=2, keep_rows=keep_rows)
    assert torch.allclose(out, plain, atol=1e-12)
    for _ in range(2):
        got = torch.autograd.grad((out * upstream).sum(), (hidden, weight, bias), retain_graph=True)
        for g, e in zip(got, expected, strict=True):
            assert torch.allclose(g, e, atol=1e-12)
    only_hidden = lm_head_logprobs(hidden, weight.detach(), targets, chunk_size=4)
    plain = (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (got,) = torch.autograd.grad((only_hidden * upstream).sum(), (hidden,))
    (expected,) = torch.autograd.grad((plain * upstream).sum(), (hidden,))
    assert torch.allclose(got, expected, atol=1e-12)


def test_lm_head_in_bfloat16_upcasts_the_logits():
    """bf16 weights: logits upcast to float32 as the reference does; values and gradients
    match autograd on the same bf16 product within bf16 precision."""
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(12, 16, generator=generator).bfloat16().requires_grad_(True)
    weight = torch.randn(40, 16, generator=generator).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 40, (12,), generator=generator)
    out = lm_head_logprobs(hidden, weight, targets, chunk_size=5, keep_rows=5)
    assert out.dtype == torch.float32
    plain = (hidden @ weight.T).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(out, plain, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (hidden, weight))
    expected = torch.autograd.grad(plain.sum(), (hidden, weight))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.bfloat16
        assert torch.allclose(g.float(), e.float(), atol=0.05, rtol=0.02)


def test_no_grad_path_gives_same_values():
    batch, hidden, weight, _ = random_case(torch.float32, seed=4)
    with_grad = response_logprobs(hidden, weight, batch.input_ids, batch.response_mask)
    with torch.no_grad():
        without = response_logprobs(hidden, weight, batch.input_ids, batch.response_mask)
    assert torch.allclose(with_grad.sum, without.sum)


def test_response_logprobs_rejects_bad_shapes():
    batch = build_sequences([[1]], [[2]], [(0, 0)], PAD)
    hidden = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"lm_head_weight must have shape \(V, H\)"):
        response_logprobs(hidden, torch.zeros(5, 3), batch.input_ids, batch.response_mask)
    with pytest.raises(ValueError, match="response_mask must be bool"):
        response_logprobs(hidden, torch.zeros(5, 4), batch.input_ids, batch.response_mask.long())
    with pytest.raises(ValueError, match="position 0"):
        response_logprobs(hidden, torch.zeros(5, 4), batch.input_ids, torch.ones(1, 2).bool())
    with pytest.raises(ValueError, match="no response tokens"):
        response_logprobs(hidden, torch.zeros(5, 4), batch.input_ids, torch.zeros(1, 2).bool())
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        response_logprobs(hidden, torch.zeros(2, 4), batch.input_ids + 5, batch.response_mask)


def test_assemble_matrix_places_values_by_pair_not_by_order():
    pairs = block_pairs(3)
    values = torch.tensor([float(10 * i + j) for i, j in pairs])
    expected = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])
    assert torch.equal(assemble_matrix(values, pairs, 3), expected)

    order = list(range(9))
    random.Random(0).shuffle(order)
    shuffled = [pairs[k] for k in order]
    assert torch.equal(assemble_matrix(values[order], shuffled, 3), expected)


def test_assemble_matrices_splits_blocks_and_keeps_gradients():
    pairs = block_pairs(2, num_blocks=2)  # block 1 uses prompts/responses 2 and 3
    assert pairs[4:] == [(2, 2), (2, 3), (3, 2), (3, 3)]
    values = torch.arange(8.0, requires_grad=True)
    matrices = assemble_matrices(values, pairs, c=2, num_blocks=2)
    assert matrices.tolist() == [[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]]
    (matrices * torch.arange(8.0).view(2, 2, 2)).sum().backward()
    assert values.grad.tolist() == list(range(8))


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([(0, 0), (0, 1), (1, 0)], "missing"),
        ([(0, 0), (0, 1), (1, 0), (1, 0)], "more than once"),
        ([(0, 0), (0, 1), (1, 0), (1, 2)], "not a"),
    ],
)
def test_assemble_matrix_rejects_bad_pairs(pairs, message):
    values = torch.zeros(len(pairs))
    with pytest.raises(ValueError, match=message):
        assemble_matrix(values, pairs, 2)


def test_assemble_matrices_rejects_pairs_across_blocks_and_wrong_length():
    pairs = [(0, 0), (0, 1), (1, 0), (1, 2)]
    with pytest.raises(ValueError, match="not a"):
        assemble_matrices(torch.zeros(4), pairs, c=2, num_blocks=2)
    with pytest.raises(ValueError, match="len\\(pairs\\)"):
        assemble_matrix(torch.zeros(3), block_pairs(2), 2)


def test_share_prompts_packs_each_prompt_once_with_its_responses():
    batch = build_sequences([[5, 6, 7], [9, 8]], [[11, 12], [13]], block_pairs(2), PAD)
    packed = share_prompts(batch.input_ids, batch.attention_mask, batch.response_mask)
    assert packed.input_ids.tolist() == [[5, 6, 7, 11, 12, 13], [9, 8, 11, 12, 13, PAD]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 2, 0]]
    assert packed.segments.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, -1]]
    # Row (0, 0) = [5 6 7 11 12]: 11 from the prompt's last output (2), 12 from 11's (3); row
    # (0, 1): 13 from 2 again; row (1, 0) = [9 8 11 12]: from 6 + 1 and 6 + 2; (1, 1) from 7.
    assert packed.predict.tolist() == [2, 3, 2, 7, 8, 7]
    assert packed.targets.tolist() == [11, 12, 13, 11, 12, 13]
    assert packed.rows.tolist() == [0, 0, 1, 2, 2, 3]
    assert packed.count.tolist() == [2, 1, 2, 1]
    allowed = packed.attention_mask()[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # the second response sees the prompt and itself, not the first
    ]
    padding_row = packed.attention_mask()[1, 0, 5].int().tolist()
    assert padding_row == [0, 0, 0, 0, 0, 1]  # padding sees only itself: no empty softmax row
    additive = packed.attention_mask(torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, packed.attention_mask())


def test_share_prompts_declines_when_nothing_is_shared_or_the_layout_differs():
    batch = build_sequences([[5, 6], [9]], [[11], [13, 14]], [(0, 0), (1, 1)], PAD)
    assert share_prompts(batch.input_ids, batch.attention_mask, batch.response_mask) is None
    batch = build_sequences([[5, 6]], [[11], [13, 14]], [(0, 0), (0, 1)], PAD)
    left_padded = batch.attention_mask.flip(1)  # [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert share_prompts(batch.input_ids, left_padded, batch.response_mask) is None
    # Long responses behind a short prompt: the packed row's attention would cost more than
    # the prompt it saves for a narrow model, but not for a wide one.
    batch = build_sequences([[5]], [[11] * 40, [13] * 40], [(0, 0), (0, 1)], PAD)
    args = (batch.input_ids, batch.attention_mask, batch.response_mask)
    assert share_prompts(*args, width=2) is None
    assert share_prompts(*args, width=4096) is not None


def test_shared_prompt_logprobs_reads_the_same_outputs_as_the_padded_batch():
    """With hidden states that depend only on a token's own sequence up to it (a stand-in for
    a causal model), the packed and padded batches score every response token alike."""
    batch, _, weight, bias = random_case(torch.float64, seed=11)
    packed = share_prompts(batch.input_ids, batch.attention_mask, batch.response_mask)
    table = torch.randn(23, 8, dtype=torch.float64)

    def causal_states(ids, visible):  # visible[g, q, k]: key k feeds query q
        return torch.einsum("gqk,gkh->gqh", visible.double(), table[ids])

    padded_visible = torch.ones(ids_shape := batch.input_ids.shape[1], ids_shape).tril().bool()
    padded_visible = padded_visible & batch.attention_mask.bool()[:, None, :]
    hidden = causal_states(batch.input_ids, padded_visible)
    packed_hidden = causal_states(packed.input_ids, packed.attention_mask()[:, 0])
    expected = response_logprobs(hidden, weight, batch.input_ids, batch.response_mask, bias=bias)
    got = shared_prompt_logprobs(packed_hidden, weight, packed, bias=bias)
    assert got.count.tolist() == expected.count.tolist()
    assert torch.allclose(got.sum, expected.sum, atol=1e-10)
    assert torch.allclose(got.mean, expected.mean, atol=1e-10)
