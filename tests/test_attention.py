"""utils/attention.py: the packed row's padded layout, the packed `varlen` attention against attention written out, and a
packed row giving each sequence its own logits through every attention implementation that keeps sequences apart.
(The trainer's packed steps, loss and gradients, are tested with the trainer: test_dpo.py, test_dpo_paths.py.)"""

import pytest
import torch

from utils.attention import padded_layout, varlen_attention_forward
from utils.data import collate_completions
from utils.logprobs import MODEL_INPUTS
from utils.modeling import PACKED_ROW_ATTENTIONS, ModelArguments, load_model

LENGTHS = [3, 1, 4]  # three sequences in one packed row, one of them a single token
CU_SEQ_LENS = torch.tensor([0, 3, 4, 8], dtype=torch.int32)


def test_padded_layout_puts_each_sequence_in_its_own_row_and_back():
    gather, scatter = padded_layout(CU_SEQ_LENS, 8, 4)
    tokens = torch.arange(8)
    rows = tokens[gather].view(3, 4)
    for row, (start, length) in enumerate(zip(CU_SEQ_LENS[:-1].tolist(), LENGTHS)):
        assert rows[row, :length].tolist() == list(range(start, start + length))  # then padding slots
    assert torch.equal(rows.flatten()[scatter], tokens)  # every token back in its place


def written_out_attention(query, key, value, scale):
    """query [heads, seq, dim], key/value [kv_heads, seq, dim]: causal softmax attention, each kv head serving
    heads // kv_heads query heads."""
    key, value = (t.repeat_interleave(query.shape[0] // t.shape[0], dim=0) for t in (key, value))
    scores = query @ key.transpose(-1, -2) * scale
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ value


def test_varlen_attention_of_a_packed_row_is_each_sequences_own_attention():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 8, 16, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(1, 2, 8, 16, generator=generator, dtype=torch.float64) for _ in range(2))  # GQA
    output, _ = varlen_attention_forward(None, query, key, value, None, scaling=0.3, cu_seq_lens_q=CU_SEQ_LENS,
                                         cu_seq_lens_k=CU_SEQ_LENS, max_length_q=4, max_length_k=4)
    assert output.shape == (1, 8, 4, 16)
    for start, end in zip(CU_SEQ_LENS[:-1].tolist(), CU_SEQ_LENS[1:].tolist()):
        expected = written_out_attention(query[0, :, start:end], key[0, :, start:end], value[0, :, start:end], 0.3)
        torch.testing.assert_close(output[0, start:end], expected.transpose(0, 1))


@pytest.mark.parametrize("attention", [name for name in PACKED_ROW_ATTENTIONS if name != "flash_attention_2"])  # CPU
def test_packed_and_padded_rows_give_each_sequence_its_own_logits(attention, tokenizer):
    tiny = dict(model_name_or_path="mixtral-tiny")
    model = load_model(ModelArguments(**tiny, attn_implementation=attention), tokenizer).eval()
    alone = load_model(ModelArguments(**tiny, attn_implementation="eager"), tokenizer).eval()  # the same weights
    texts = ["i loved it.", "no.", "the plot was dull and slow, and the acting was weak."]
    sequences = [tokenizer(text)["input_ids"] for text in texts]
    packed, padded = (collate_completions([[]] * len(sequences), sequences, tokenizer.pad_token_id, padding_free)
                      for padding_free in (True, False))
    with torch.no_grad():  # no KV cache, as in training: with one, sdpa and eager build no block mask
        packed_logits = model(**{key: packed[key] for key in MODEL_INPUTS if key in packed}, use_cache=False).logits[0]
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              use_cache=False).logits
        start = 0
        for row, ids in enumerate(sequences):
            expected = alone(torch.tensor([ids])).logits[0]  # one sequence, no packing, no padding
            torch.testing.assert_close(packed_logits[start:start + len(ids)], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(padded_logits[row, :len(ids)], expected, rtol=1e-5, atol=1e-5)
            start += len(ids)
    assert packed["input_ids"].shape[1] == start < padded["input_ids"].numel()  # the padded batch does pad
