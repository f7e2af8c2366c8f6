"""Text encoding: image markers expand to exactly the geometry's token counts; labels cover only targets."""

from __future__ import annotations

import pytest

from vlmtrain.modeling.tokenizers import IGNORE_INDEX, build_byte_tokenizer, load_tokenizer
from vlmtrain.text.encoding import TextEncoder, TextError


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(build_byte_tokenizer(), "<image>")


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    tokenizer = build_byte_tokenizer()
    text = "héllo wörld ✓ 中文 <b>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path), "<image>")
    assert reloaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded.convert_tokens_to_ids("<image>") == tokenizer.convert_tokens_to_ids("<image>")


def test_one_image_expands_to_its_token_count(encoder):
    encoded = encoder.encode("<image>Word:", "cat", [12])
    ids, labels = encoded.input_ids, encoded.labels
    tok = encoder.tokenizer
    assert ids[0] == tok.bos_token_id
    assert ids[1:13] == [encoder.image_token_id] * 12
    assert tok.decode(ids[13:-1]) == "Word:cat"
    assert ids[-1] == tok.eos_token_id
    target_start = len(ids) - 4
    assert labels[:target_start] == [IGNORE_INDEX] * target_start
    assert labels[target_start:] == ids[target_start:]


def test_several_images_each_get_their_own_count_in_order(encoder):
    ids = encoder.encode("A <image> then <image>.", "ok", [3, 5]).input_ids
    image = encoder.image_token_id
    runs, current = [], 0
    for token in ids + [None]:
        if token == image:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    assert runs == [3, 5]
    assert encoder.tokenizer.decode([t for t in ids if t != image], skip_special_tokens=True) == "A  then .ok"


def test_prompt_without_marker_gets_images_in_front(encoder):
    ids = encoder.encode("Caption:", "x", [2, 4]).input_ids
    assert ids[1:7] == [encoder.image_token_id] * 6


def test_one_marker_stands_for_all_images_of_the_sample(encoder):
    ids = encoder.encode("Look: <image> now", "x", [2, 3]).input_ids
    image = encoder.image_token_id
    first = ids.index(image)
    assert ids[first : first + 5] == [image] * 5 and ids.count(image) == 5
    assert encoder.tokenizer.decode([t for t in ids if t != image], skip_special_tokens=True) == "Look:  nowx"
    without = encoder.encode("Look: <image> now", "x", []).input_ids
    assert image not in without and encoder.tokenizer.decode(without, skip_special_tokens=True) == "Look:  nowx"


def test_a_prompt_that_starts_with_the_bos_token_gets_no_second_one(encoder):
    ids = encoder.encode_prompt("<bos>chat <image>", [2])
    assert ids.count(encoder.tokenizer.bos_token_id) == 1 and ids[0] == encoder.tokenizer.bos_token_id


def test_text_only_sample(encoder):
    encoded = encoder.encode("Say hi:", "hi", [])
    assert encoder.image_token_id not in encoded.input_ids
    assert sum(label != IGNORE_INDEX for label in encoded.labels) == 3  # "h", "i", eos


@pytest.mark.parametrize(
    "prompt, target, tokens, message",
    [
        ("<image><image>", "x", [3], "2 image markers for 1 images"),
        ("<image> and <image>", "x", [3, 4, 5], "2 image markers for 3 images"),
        ("<image>", "look: <image>", [3], "image token"),
    ],
)
def test_unusable_text_is_refused(encoder, prompt, target, tokens, message):
    with pytest.raises(TextError, match=message):
        encoder.encode(prompt, target, tokens)


def test_the_text_length_limit_counts_text_not_image_tokens(encoder, tmp_path):
    """A sample's text (prompt, target, BOS and EOS; not its image placeholders) may be data.text.max_length
    tokens long; a longer one is skipped as text_too_long."""
    from vlmtrain.data.builder import BatchBuilder
    from vlmtrain.data.config import DecodingConfig, TextConfig
    from vlmtrain.data.samples import RawSample, SampleError
    from vlmtrain.modeling.geometry import Geometry

    builder = BatchBuilder(Geometry(16, 1), encoder, TextConfig(prompt="<image>", max_length=6), DecodingConfig())
    assert builder.text_tokens(RawSample("a", {"text": "word"})) == 6  # bos + 4 bytes + eos
    assert len(encoder.encode("<image>", "word", [1000]).input_ids) == 1 + 1000 + 4 + 1
    with pytest.raises(SampleError, match="text is 7 tokens, more than data.text.max_length=6") as caught:
        builder.text_tokens(RawSample("b", {"text": "words"}))
    assert caught.value.kind == "text_too_long"
