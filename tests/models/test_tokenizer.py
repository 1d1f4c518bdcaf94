"""Local tokenizers and chat-template prompts (no hub access)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from topd_jax.models import build_prompt, encode_prompts, load_tokenizer
from topd_jax.models.tokenizer import has_tokenizer, tokenizer_mismatch

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
VOCAB = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hello", "world", "be", "brief"]


def make_tokenizer(vocab=VOCAB, eos="<|im_end|>", special=("<|im_start|>", "<|im_end|>")):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", chat_template=TEMPLATE, eos_token=eos,
                                   additional_special_tokens=list(special))


@pytest.fixture
def tokenizer_dir(tmp_path):
    make_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_prompt_uses_the_checkpoint_chat_template(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert build_prompt(tok, "hello world") == "<|im_start|>user hello world<|im_end|> <|im_start|>assistant "
    text = build_prompt(tok, [{"role": "user", "content": "hello"}], system="be brief", add_generation_prompt=False)
    assert text == "<|im_start|>system be brief<|im_end|> <|im_start|>user hello<|im_end|> "


def test_encode_prompts_adds_no_second_special_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert encode_prompts(tok, ["hello world", "world"]) == [[1, 3, 6, 7, 2, 1, 4], [1, 3, 7, 2, 1, 4]]


def test_missing_directory_and_missing_template_are_clear(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory .* does not exist"):
        load_tokenizer(tmp_path / "absent")
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        build_prompt(tok, "hello")


def test_identical_tokenizers_agree(tokenizer_dir):
    assert tokenizer_mismatch(load_tokenizer(tokenizer_dir), make_tokenizer()) is None
    assert has_tokenizer(tokenizer_dir) and not has_tokenizer(tokenizer_dir / "absent") and not has_tokenizer(None)


def test_permuted_ids_of_the_same_words_are_the_first_disagreement():
    permuted = VOCAB[:6] + ["world", "hello"] + VOCAB[8:]  # same size, same words, two ids swapped
    assert tokenizer_mismatch(make_tokenizer(), make_tokenizer(permuted)) == (
        "token 'hello' is id 6 in the student's tokenizer but id 7 in the teacher's")


def test_another_eos_is_named_before_the_vocabulary():
    other = VOCAB[:8] + ["<eos>", "brief"]
    assert tokenizer_mismatch(make_tokenizer(), make_tokenizer(other, eos="<eos>")) == (
        "eos token '<|im_end|>' (id 2) in the student's tokenizer but '<eos>' (id 8) in the teacher's")


def test_a_token_special_on_one_side_only_and_extra_words_are_named():
    assert tokenizer_mismatch(make_tokenizer(), make_tokenizer(special=("<|im_end|>",))) == (
        "special token '<|im_start|>' of the student's tokenizer is not special in the teacher's")
    more = make_tokenizer(VOCAB + ["extra"])
    assert tokenizer_mismatch(make_tokenizer(), more) == (
        "token 'extra' (id 10) of the teacher's tokenizer is absent from the student's")
    assert tokenizer_mismatch(more, make_tokenizer()) == (
        "token 'extra' is id 10 in the student's tokenizer but absent in the teacher's")
