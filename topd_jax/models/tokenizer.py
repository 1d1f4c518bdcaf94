"""Tokenizers and chat prompts from a local checkpoint directory (transformers, no hub access),
and the check that two models' tokenizers agree (the ids both models' log-probs are indexed by)."""

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


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer(path: str | os.PathLike | None) -> bool:
    """Whether the directory `path` holds tokenizer files (tokenizer.json or tokenizer_config.json)."""
    return path is not None and any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_MARKERS)


def tokenizer_mismatch(a, b, names: tuple[str, str] = ("student", "teacher")) -> str | None:
    """The first disagreement between tokenizers `a` and `b`, as one phrase, or None.

    Checked in order: the EOS token and its id, the special tokens (bos, eos, unk, pad and the
    additional ones, by text and id), then the whole vocabulary token -> id (added tokens
    included), in id order of `a`, then the tokens only `b` has.
    """
    na, nb = names
    for attr in ("eos_token", "bos_token", "unk_token", "pad_token"):
        ta, tb = getattr(a, attr, None), getattr(b, attr, None)
        ia, ib = getattr(a, f"{attr}_id", None), getattr(b, f"{attr}_id", None)
        if (ta, ia) != (tb, ib):
            return (f"{attr.replace('_token', '')} token {ta!r} (id {ia}) in the {na}'s tokenizer but {tb!r} "
                    f"(id {ib}) in the {nb}'s")
    sa, sb = set(a.all_special_tokens), set(b.all_special_tokens)
    if sa != sb:
        token, side, other = ((min(sa - sb), na, nb) if sa - sb else (min(sb - sa), nb, na))
        return f"special token {token!r} of the {side}'s tokenizer is not special in the {other}'s"
    va, vb = a.get_vocab(), b.get_vocab()
    for token, i in sorted(va.items(), key=lambda kv: kv[1]):
        j = vb.get(token)
        if j != i:
            theirs = "absent" if j is None else f"id {j}"
            return f"token {token!r} is id {i} in the {na}'s tokenizer but {theirs} in the {nb}'s"
    extra = sorted((i, token) for token, i in vb.items() if token not in va)
    if extra:
        return f"token {extra[0][1]!r} (id {extra[0][0]}) of the {nb}'s tokenizer is absent from the {na}'s"
    return None


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


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (base models often have none)."""
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(prompt: str | Sequence[Message], *, system: str | None = None) -> str:
    """A conversation as plain text, for a tokenizer without a chat template: the system prompt
    and each message's content, a blank line apart."""
    parts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    return "\n\n".join([system, *parts] if system is not None else parts)


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[Message]], *, chat: bool = True,
                   **kwargs: Any) -> list[list[int]]:
    """Token ids of each chat prompt (build_prompt kwargs apply). The template already holds any
    BOS/special tokens, so none are added again. `chat=False`: each prompt is `plain_prompt`
    (system prompt and messages as text, for a tokenizer without a chat template) with the
    tokenizer's own special tokens (a BOS) added."""
    if not chat:
        texts = [plain_prompt(p, system=kwargs.get("system")) for p in prompts]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    texts = [build_prompt(tokenizer, p, **kwargs) for p in prompts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
