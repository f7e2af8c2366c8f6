"""Text side of a sample: tokenizers and the expansion of image markers into image placeholder tokens.

Each ``<image>`` marker in a prompt becomes exactly as many placeholder tokens as the geometry gives
that image; the model later replaces them with the image's visual tokens, one for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IGNORE_INDEX = -100
BYTE_TOKENIZER = "byte"


class TextError(ValueError):
    """A sample whose text cannot be encoded (its image markers); the pipeline skips and counts it."""


def build_byte_tokenizer(image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + pad/bos/eos/image) that needs no files or network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [image_token]})
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


@dataclass(frozen=True)
class EncodedText:
    """Token ids of one sample and its labels (IGNORE_INDEX on prompt and image positions)."""

    input_ids: list[int]
    labels: list[int]


class TextEncoder:
    """Turns (prompt, target, tokens per image) into input ids with expanded placeholders and labels."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token: str) -> None:
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no id for the image token {image_token!r}")
        self._ids = lru_cache(maxsize=16384)(self._tokenize)  # a sample's text is measured, then encoded

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def encode_prompt(self, prompt: str, image_tokens: list[int]) -> list[int]:
        """The prompt's token ids (after a BOS token when the tokenizer has one and the prompt does not start
        with it, as chat templates do); image ``i`` becomes ``image_tokens[i]`` placeholders.

        Several markers in ``prompt`` place the images one for one; a single marker (or none: the front)
        stands for all of the sample's images in order, so one template serves samples with 0, 1 or many.
        Raises :class:`TextError` when markers and images cannot be matched.
        """
        pieces = prompt.split(self.image_token)
        if len(pieces) - 1 != len(image_tokens):
            if len(pieces) > 2:
                raise TextError(f"prompt has {len(pieces) - 1} image markers for {len(image_tokens)} images")
            before, after = pieces if len(pieces) == 2 else ("", pieces[0])
            pieces = [before] + [""] * (len(image_tokens) - 1) + [after] if image_tokens else [before + after]
        bos = self.tokenizer.bos_token
        input_ids = [self.tokenizer.bos_token_id] if bos is not None and not prompt.startswith(bos) else []
        for piece, count in zip(pieces, image_tokens + [0], strict=True):
            input_ids += [*self._ids(piece), *[self.image_token_id] * count]
        return input_ids

    def encode(self, prompt: str, target: str, image_tokens: list[int]) -> EncodedText:
        """Encode one training sample: the prompt (see :meth:`encode_prompt`), then the target and EOS, which
        alone carry labels. Raises :class:`TextError` when markers and images cannot be matched."""
        input_ids = self.encode_prompt(prompt, image_tokens)
        prompt_length = len(input_ids)
        target_ids = [*self._ids(target), self.tokenizer.eos_token_id]
        input_ids += target_ids
        if input_ids.count(self.image_token_id) != sum(image_tokens):
            raise TextError(f"text contains the image token {self.image_token!r} outside the image markers")
        labels = [IGNORE_INDEX] * prompt_length + target_ids
        return EncodedText(input_ids=input_ids, labels=labels)
