import torch

from utils.logprobs import completion_logps


def test_completion_logps_equals_a_token_by_token_loop():
    g = torch.Generator().manual_seed(0)
    batch, seq, vocab = 3, 7, 11
    logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    input_ids = torch.randint(vocab, (batch, seq), generator=g)
    # row 0: prompt 2 tokens, completion 5; row 1: prompt 3, completion 2, then padding; row 2: prompt 1, completion 6
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])

    sums, counts = completion_logps(logits, input_ids, completion_mask)

    for row in range(batch):
        expected = 0.0
        for t in range(seq):
            if completion_mask[row, t]:
                expected += torch.log_softmax(logits[row, t - 1], dim=-1)[input_ids[row, t]].item()
        assert abs(sums[row].item() - expected) < 1e-6
        assert counts[row].item() == completion_mask[row].sum().item()


def test_gradient_flows_only_through_completion_positions():
    logits = torch.randn(1, 5, 7, requires_grad=True)
    input_ids = torch.randint(7, (1, 5))
    completion_mask = torch.tensor([[0, 0, 1, 1, 0]])  # tokens 2 and 3 count, predicted by positions 1 and 2
    sums, _ = completion_logps(logits, input_ids, completion_mask)
    sums.sum().backward()
    touched = logits.grad.abs().sum(-1)[0] > 0
    assert touched.tolist() == [False, True, True, False, False]
