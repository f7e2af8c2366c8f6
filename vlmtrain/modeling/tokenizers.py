"""Tokenizers: a local folder's, or a byte-level one that needs no files, each with an image token."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IGNORE_INDEX = -100
BYTE_TOKENIZER = "byte"
# The byte tokenizer's chat template: a role name and a colon before each turn; an assistant turn ends
# with <eos>, the token that training labels after its content and generation stops at.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def build_byte_tokenizer(image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + pad/bos/eos/image) that needs no files or network, with
    :data:`BYTE_CHAT_TEMPLATE` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [image_token]})
    fast.chat_template = BYTE_CHAT_TEMPLATE
    return fast


def load_tokenizer(source: str | None, image_token: str) -> PreTrainedTokenizerBase:
    """The tokenizer at local path ``source`` (or the byte tokenizer for ``None``/``"byte"``), with an image
    token and a pad token added when it lacks them."""
    if source in (None, BYTE_TOKENIZER):
        return build_byte_tokenizer(image_token)
    if not Path(source).is_dir():
        raise FileNotFoundError(f"tokenizer folder {source!r} not found (only local paths are read)")
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
