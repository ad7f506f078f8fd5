import pytest
import torch

from helpers import loop_logps
from utils import logprobs
from utils.logprobs import completion_logps, model_logps
from utils.modeling import ModelArguments, apply_lora, load_model, load_tokenizer


def random_case(seed=0, rows=3, seq=7, dim=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, dim, generator=g, dtype=torch.float64, requires_grad=True)
    output_layer = torch.nn.Linear(dim, vocab, bias=False).double()
    input_ids = torch.randint(vocab, (rows, seq), generator=g)
    # row 0: prompt 2, completion 5; row 1: prompt 3, completion 2, then padding; row 2: prompt 1, completion 6
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    return hidden, output_layer, input_ids, completion_mask


def positions_of(completion_mask):
    """completion_logps' index arguments from a [rows, seq] mask of the tokens that count (first column unused)."""
    rows, seq = completion_mask.shape
    flat = completion_mask.flatten().nonzero().squeeze(1)
    return flat, flat // seq, rows


def plain_logps(hidden, output_layer, input_ids, completion_mask):
    """The textbook computation: full logits, log_softmax, gather, masked sum."""
    logprobs = torch.log_softmax(output_layer(hidden)[:, :-1], dim=-1)
    token_logps = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def test_values_equal_a_token_by_token_loop():
    hidden, output_layer, input_ids, completion_mask = random_case()
    sums, counts = completion_logps(hidden, output_layer, input_ids, *positions_of(completion_mask), chunk_size=3)
    logits = output_layer(hidden)
    for row in range(3):
        expected = sum(torch.log_softmax(logits[row, t - 1], -1)[input_ids[row, t]].item()
                       for t in range(7) if completion_mask[row, t])
        assert sums[row].item() == pytest.approx(expected, abs=1e-9)
        assert counts[row].item() == completion_mask[row].sum().item()


@pytest.mark.parametrize("softmax_rows", [2, logprobs.CPU_SOFTMAX_ROWS])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_gradients_equal_the_plain_computation(chunk_size, softmax_rows, monkeypatch):
    monkeypatch.setattr(logprobs, "CPU_SOFTMAX_ROWS", softmax_rows)  # 2: a chunk's logits in several slices
    hidden, output_layer, input_ids, completion_mask = random_case(seed=1)
    weights = torch.randn(3, dtype=torch.float64)
    sums, _ = completion_logps(hidden, output_layer, input_ids, *positions_of(completion_mask), chunk_size=chunk_size)
    (sums * weights).sum().backward()
    chunked_grads = hidden.grad.clone(), output_layer.weight.grad.clone()
    hidden.grad, output_layer.weight.grad = None, None

    (plain_logps(hidden, output_layer, input_ids, completion_mask) * weights).sum().backward()
    torch.testing.assert_close(chunked_grads[0], hidden.grad)
    torch.testing.assert_close(chunked_grads[1], output_layer.weight.grad)
    assert chunked_grads[0][1, 5:].abs().sum() == 0  # padding positions get no gradient


def test_packed_sequences_sum_by_sequence():
    hidden, output_layer, input_ids, completion_mask = random_case(seed=2)
    padded, _ = completion_logps(hidden, output_layer, input_ids, *positions_of(completion_mask))
    lengths = [7, 5, 7]  # row 1 is padded after 5 tokens
    packed_hidden = torch.cat([hidden[r, :n] for r, n in enumerate(lengths)]).unsqueeze(0)
    packed_ids = torch.cat([input_ids[r, :n] for r, n in enumerate(lengths)]).unsqueeze(0)
    packed_mask = torch.cat([completion_mask[r, :n] for r, n in enumerate(lengths)])
    positions = packed_mask.nonzero().squeeze(1)
    sequence = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])[positions]
    packed, counts = completion_logps(packed_hidden, output_layer, packed_ids, positions, sequence, 3)
    torch.testing.assert_close(packed, padded)
    assert counts.tolist() == [5, 2, 6]


@pytest.mark.parametrize("use_peft", [False, True])
def test_model_logps_equal_plain_transformers(use_peft):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="mixtral-tiny"))
    model = load_model(ModelArguments(model_name_or_path="mixtral-tiny"), tokenizer)
    if use_peft:
        model = apply_lora(model, ModelArguments(use_peft=True))
        with torch.no_grad():  # a non-trivial adapter (LoRA starts as a no-op)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
    prompts, completions = [[5, 9, 12], [7, 8]], [[30, 31, 2], [40, 2]]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    rows = [p + c + [0] * (width - len(p) - len(c)) for p, c in zip(prompts, completions)]
    completion_mask = torch.tensor([[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c))
                                    for p, c in zip(prompts, completions)])
    positions, sequence, _ = positions_of(completion_mask)
    batch = {"input_ids": torch.tensor(rows),
             "attention_mask": torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c))
                                             for p, c in zip(prompts, completions)]),
             "completion_positions": positions, "completion_sequence": sequence}
    model.eval()  # LoRA dropout off: both computations must see the same function
    sums, counts, aux_loss = model_logps(model, batch, router_aux_loss=True, chunk_size=2)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        assert sums[row].item() == pytest.approx(loop_logps(model, prompt, completion), abs=1e-4)
    assert counts.tolist() == [3, 2]
    assert aux_loss is not None and aux_loss.item() > 0
