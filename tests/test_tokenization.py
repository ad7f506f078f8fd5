"""utils/data.py with tokenizers in the styles of real ones: bos is never cut and never doubled, and every completion
ends in exactly one eos, in every format and truncation mode.

The tokenizers are built here (a small BPE vocabulary trained on the toy corpus), with special tokens and chat
templates in the style of ChatML (SmolLM2/Qwen: no bos, <|im_end|> ends turns and is eos), Llama-3 (the template
writes <|begin_of_text|>, <|eot_id|> ends turns and is eos, the post-processor adds bos) and Llama-2/Mistral
(add_bos_token, bos before each [INST] turn, an answer ends in ' </s>')."""

import string

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from utils import toy_task
from utils.data import DataArguments, prepare_split

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

STYLES = {  # special tokens, bos, eos, pad, chat template, whether the post-processor adds bos
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", CHATML_TEMPLATE,
               False),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3_TEMPLATE, True),
    "llama2": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>", LLAMA2_TEMPLATE, True),
}
_TOKENIZERS = {}


def styled_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A BPE tokenizer in `style`: byte-level like GPT-2/Llama-3/Qwen, or SentencePiece-like (Metaspace) like
    Llama-2."""
    if style not in _TOKENIZERS:
        specials, bos, eos, pad, template, adds_bos = STYLES[style]
        if style == "llama2":
            backend = Tokenizer(models.BPE(unk_token="<unk>"))
            backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
            backend.decoder = decoders.Metaspace(prepend_scheme="first")
            alphabet = list(string.printable) + ["\u2581"]
        else:
            backend = Tokenizer(models.BPE())
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=alphabet,
                                      show_progress=False)
        backend.train_from_iterator(toy_task.make_corpus(2000, seed=11), trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                            chat_template=template)
        tokenizer.add_bos_token, tokenizer.add_eos_token = adds_bos, False
        assert (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id) == adds_bos
        _TOKENIZERS[style] = tokenizer
    return _TOKENIZERS[style]


HISTORY = [{"role": "system", "content": "you review films for a living and you are honest about them."},
           {"role": "user", "content": "i watched this movie last night with my sister and my brother."},
           {"role": "assistant", "content": "what did you think of the acting and the music?"},
           {"role": "user", "content": "the plot felt clever but the ending was painful. your view?"}]
GOOD = {"role": "assistant", "content": "the acting was wonderful and the music was lovely and moving."}
BAD = {"role": "assistant", "content": "no idea."}
HH_PROMPT = ("\n\nHuman: i watched this movie last night with my sister.\n\nAssistant: what did you think of it?"
             "\n\nHuman: the plot felt clever but the ending was painful. your view?\n\nAssistant:")


def row_in(fmt: str, tokenizer) -> dict:
    if fmt == "explicit":  # the prompt text as the chat template renders it: with the bos string where it writes one
        prompt = tokenizer.apply_chat_template(HISTORY, tokenize=False, add_generation_prompt=True)
        return {"prompt": prompt, "chosen": " " + GOOD["content"], "rejected": " " + BAD["content"]}
    if fmt == "implicit":  # HH-RLHF text, no special tokens in it
        return {"chosen": HH_PROMPT + " " + GOOD["content"], "rejected": HH_PROMPT + " " + BAD["content"]}
    if fmt == "ultrafeedback":
        return {"chosen": HISTORY + [GOOD], "rejected": HISTORY + [BAD]}
    return {"prompt": HISTORY, "chosen": [GOOD], "rejected": [BAD]}  # TRL's conversational format


def expected_sequences(fmt: str, tokenizer) -> tuple[list[int], list[int]]:
    """The untruncated chosen and rejected sequences, computed the way a user would: a text pair as the tokenizer
    encodes it (its post-processor's bos, none where the text already has one) plus eos; a conversation as the
    chat template renders it, up to the eos that ends the answer."""
    row = row_in(fmt, tokenizer)
    sequences = []
    for side, answer in (("chosen", GOOD), ("rejected", BAD)):
        if fmt in ("explicit", "implicit"):
            text = row["prompt"] + row[side] if fmt == "explicit" else row[side]
            has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
            sequences.append(tokenizer(text, add_special_tokens=not has_bos)["input_ids"] + [tokenizer.eos_token_id])
        else:
            text = tokenizer.apply_chat_template(HISTORY + [answer], tokenize=False).rstrip()
            sequences.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sequences[0], sequences[1]


def prepare(fmt: str, tokenizer, **kwargs) -> dict:
    (row,) = prepare_split(Dataset.from_list([row_in(fmt, tokenizer)]), DataArguments(dataset_name="inline", **kwargs),
                           tokenizer, "train")
    return row


FORMATS = ["explicit", "implicit", "ultrafeedback", "trl"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", list(STYLES))
def test_untruncated_pairs_match_the_tokenizer_and_the_chat_template(style, fmt):
    tokenizer = styled_tokenizer(style)
    row = prepare(fmt, tokenizer, max_length=10_000)
    chosen, rejected = expected_sequences(fmt, tokenizer)
    assert row["prompt_input_ids"] + row["chosen_input_ids"] == chosen
    assert row["prompt_input_ids"] + row["rejected_input_ids"] == rejected
    assert_bos_once(row, tokenizer)
    for side in ("chosen", "rejected"):
        assert_ends_in_one_eos(row[f"{side}_input_ids"], tokenizer)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end", "max_prompt_length"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", list(STYLES))
def test_truncation_never_cuts_bos_and_keeps_one_eos_on_whole_completions(style, fmt, mode):
    tokenizer = styled_tokenizer(style)
    full = prepare(fmt, tokenizer, max_length=10_000)
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    assert full["prompt_input_ids"][:len(prefix)] == prefix
    prompt_rest = full["prompt_input_ids"][len(prefix):]
    chosen, rejected = full["chosen_input_ids"], full["rejected_input_ids"]
    assert len(prompt_rest) > 40 and len(chosen) > len(rejected) + 3, "the row must be long enough to cut"
    if mode == "keep_start":  # the prompt whole, the longer completion cut at its end (its eos with it)
        row = prepare(fmt, tokenizer, max_length=len(full["prompt_input_ids"]) + len(rejected), truncation_mode=mode)
        assert row["prompt_input_ids"] == full["prompt_input_ids"]
        assert row["chosen_input_ids"] == chosen[:len(rejected)]
        assert tokenizer.eos_token_id not in row["chosen_input_ids"]
        assert row["rejected_input_ids"] == rejected
        return
    if mode == "keep_end":  # completions whole, the prompt cut from the left after bos: max_length exactly
        row = prepare(fmt, tokenizer, max_length=len(prefix) + len(chosen) + 20, truncation_mode=mode)
        assert row["prompt_input_ids"] == prefix + prompt_rest[-20:]
    else:  # the prompt cut from the left to that many tokens, bos kept and counted
        row = prepare(fmt, tokenizer, max_length=10_000, max_prompt_length=len(prefix) + 10)
        assert row["prompt_input_ids"] == prefix + prompt_rest[-10:]
    assert (row["chosen_input_ids"], row["rejected_input_ids"]) == (chosen, rejected)
    assert_bos_once(row, tokenizer)
    for side in ("chosen", "rejected"):
        assert_ends_in_one_eos(row[f"{side}_input_ids"], tokenizer)


@pytest.mark.parametrize("mode", ["keep_end", "max_prompt_length"])
@pytest.mark.parametrize("fmt", ["explicit", "ultrafeedback", "trl"])
def test_a_cut_at_an_inner_bos_keeps_one_bos(fmt, mode):
    """Llama-2's template writes bos before every [INST] turn: a prompt cut exactly before a later turn's bos starts
    with the kept bos, then the turn ([INST] ...), not with two."""
    tokenizer = styled_tokenizer("llama2")
    full = prepare(fmt, tokenizer, max_length=10_000)
    bos = tokenizer.bos_token_id
    prompt_rest, chosen = full["prompt_input_ids"][1:], full["chosen_input_ids"]
    inner = max(i for i, token in enumerate(prompt_rest) if token == bos)  # the last turn's bos
    keep = len(prompt_rest) - inner  # from that bos on
    if mode == "keep_end":
        max_length = 1 + len(chosen) + keep
        assert max_length - len(chosen) >= max_length // 2, "the cut must be the one that keeps completions whole"
        row = prepare(fmt, tokenizer, max_length=max_length, truncation_mode=mode)
    else:
        row = prepare(fmt, tokenizer, max_length=10_000, max_prompt_length=1 + keep)
    assert row["prompt_input_ids"] == [bos] + prompt_rest[inner + 1:]
    assert tokenizer.convert_ids_to_tokens(row["prompt_input_ids"][:3]) == ["<s>", "[", "I"]
    assert (row["chosen_input_ids"], row["rejected_input_ids"]) == (chosen, full["rejected_input_ids"])
    assert_bos_once(row, tokenizer)


def assert_bos_once(row, tokenizer):
    sequence = row["prompt_input_ids"]
    if tokenizer.bos_token_id is None:
        return
    assert sequence[0] == tokenizer.bos_token_id and sequence[1] != tokenizer.bos_token_id, "bos first, once"


def assert_ends_in_one_eos(completion, tokenizer):
    assert completion[-1] == tokenizer.eos_token_id and completion.count(tokenizer.eos_token_id) == 1, completion
