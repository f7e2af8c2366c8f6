"""Encoding a sample's text: its token ids, with each image's placeholders, and its labels.

Each image becomes exactly as many placeholder tokens as the geometry gives it; the model later replaces
them with the image's visual tokens, one for one. A prompt/target sample is encoded as written (the prompt
template is literal text); a conversation goes through the tokenizer's chat template (:mod:`.chat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from vlmtrain.modeling.prompt import IMAGE, TextError, image_bounds, placeholder_span, prompt_ids
from vlmtrain.modeling.tokenizers import IGNORE_INDEX
from vlmtrain.text.chat import chat_segments, generation_prompt
from vlmtrain.text.conversation import as_template_messages


@dataclass(frozen=True)
class EncodedText:
    """Token ids of one sample and its labels (IGNORE_INDEX on prompt and image positions)."""

    input_ids: list[int]
    labels: list[int]


class TextEncoder:
    """Turns (prompt, target, tokens per image) into input ids with expanded placeholders and labels."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token: str, video_token: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no id for the image token {image_token!r}")
        # a video frame's placeholders: the family's video token (Gemma 4's, Qwen-VL's), else the image token
        self.video_token_id = self.image_token_id if video_token is None else tokenizer.convert_tokens_to_ids(video_token)
        self.bounds = image_bounds(tokenizer, image_token)
        self._ids = lru_cache(maxsize=16384)(self._tokenize)  # a sample's text is measured, then encoded

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def encode_prompt(self, prompt: str, image_tokens: list[int], kinds: Sequence[int] = ()) -> list[int]:
        """The prompt's token ids, image ``i`` as ``image_tokens[i]`` placeholders (a video's unit as ``kinds[i]``
        says: :func:`.prompt.prompt_ids`)."""
        token, token_id = self.image_token, self.image_token_id
        return prompt_ids(self.tokenizer, prompt, token, token_id, image_tokens, self._ids, kinds, self.video_token_id)

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

    def _expand(self, text: str, image_tokens: list[int], images_before: int, kinds: Sequence[int] = ()) -> list[int]:
        """Token ids of ``text`` with its image tokens expanded, the first one to ``image_tokens[images_before]``
        placeholders, and so on; ``kinds`` says which are a video's units (:data:`~vlmtrain.modeling.prompt.FRAME`:
        video tokens; ``NEXT_FRAME``: in the previous unit's bounds)."""
        pieces = text.split(self.image_token)
        if images_before + len(pieces) - 1 > len(image_tokens):
            raise TextError(f"the conversation places more images than the sample has ({len(image_tokens)})")
        kinds = list(kinds) + [IMAGE] * (len(image_tokens) - len(kinds))
        token_ids = (self.image_token_id, self.video_token_id)
        ids: list[int] = []
        for index, piece in enumerate(pieces):
            if index:
                ids += placeholder_span(self.bounds, token_ids, image_tokens, kinds, images_before + index - 1)
            ids += self._ids(piece)
        return ids

    def encode_chat(
        self, messages: list[dict], image_tokens: list[int], train_on: str, kinds: Sequence[int] = ()
    ) -> EncodedText:
        """Encode a stored conversation (:mod:`vlmtrain.text.conversation`) through the tokenizer's chat
        template: image ``i`` becomes ``image_tokens[i]`` placeholders (a video's unit as ``kinds[i]`` says:
        :meth:`_expand`); the content and end-of-turn token of the assistant turns ``train_on`` names carry
        labels (:func:`~vlmtrain.text.chat.chat_segments`)."""
        segments = chat_segments(self.tokenizer, as_template_messages(messages, self.image_token), self.image_token, train_on)
        input_ids: list[int] = []
        labels: list[int] = []
        placed = 0
        for segment in segments:
            ids = self._expand(segment.text, image_tokens, placed, kinds)
            placed += segment.text.count(self.image_token)
            input_ids += ids
            labels += ids if segment.labelled else [IGNORE_INDEX] * len(ids)
        if placed != len(image_tokens):
            raise TextError(f"the conversation places {placed} images, the sample has {len(image_tokens)}")
        return EncodedText(input_ids=input_ids, labels=labels)

    def encode_chat_prompt(self, messages: list[dict], image_tokens: list[int], kinds: Sequence[int] = ()) -> list[int]:
        """Token ids that ask the model for the next assistant turn of a stored conversation (``kinds``: as in
        :meth:`encode_chat`)."""
        prompt = generation_prompt(self.tokenizer, as_template_messages(messages, self.image_token))
        return self._expand(prompt, image_tokens, 0, kinds)
