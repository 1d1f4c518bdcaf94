"""Local tokenizers and chat-template prompts (no hub access)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from topd_jax.models import build_prompt, encode_prompts, load_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
VOCAB = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hello", "world", "be", "brief"]


@pytest.fixture
def tokenizer_dir(tmp_path):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", chat_template=TEMPLATE,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.save_pretrained(tmp_path)
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
