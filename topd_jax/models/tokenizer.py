"""Tokenizers and chat prompts from a local checkpoint directory (transformers, no hub access)."""

from __future__ import annotations

import os
from typing import Any, Sequence

Message = dict[str, str]


def load_tokenizer(path: str | os.PathLike):
    """transformers.AutoTokenizer from the local directory `path`; never downloads."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_prompt(tokenizer, prompt: str | Sequence[Message], *, system: str | None = None,
                 add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
    """The checkpoint's chat template applied to one conversation, as text.

    `prompt` is a user message or a list of {"role", "content"} messages; `system` prepends a
    system message. Extra keyword arguments reach the template (e.g. enable_thinking=False).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[Message]], **kwargs: Any) -> list[list[int]]:
    """Token ids of each chat prompt (build_prompt kwargs apply). The template already holds any
    BOS/special tokens, so none are added again."""
    texts = [build_prompt(tokenizer, p, **kwargs) for p in prompts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
