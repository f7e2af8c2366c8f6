"""Conversations through real chat templates: the labelled tokens are exactly the assistant turns' contents
and end-of-turn tokens, every image gets its placeholders, and generation prompts are what training saw."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from helpers import ROOT

from vlmtrain.errors import UserError
from vlmtrain.modeling.tokenizers import IGNORE_INDEX, build_byte_tokenizer, load_tokenizer
from vlmtrain.text.chat import CHATML, ChatTemplateError, resolve_chat_template, stop_tokens
from vlmtrain.text.encoding import TextEncoder

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
THINK = (  # Qwen3-style: an empty reasoning block written before every assistant turn's content
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Answer in a few words."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is written here?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "The word moon."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "And in these two? "},
            {"type": "image"},
            {"type": "text", "text": ", "},
            {"type": "image"},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "A cat, then a cup of coffee."}]},
]
ASSISTANT = ["The word moon.", "A cat, then a cup of coffee."]
IMAGE_TOKENS = [12, 3, 7]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    """The SmolLM2-135M-Instruct tokenizer with its own chat template (tests/data), as a tokenizer folder."""
    source = ROOT / "tests" / "data" / "smollm2-tokenizer"
    folder = tmp_path_factory.mktemp("smollm2")
    with gzip.open(source / "tokenizer.json.gz") as packed, (folder / "tokenizer.json").open("wb") as out:
        shutil.copyfileobj(packed, out)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    return folder


def tokenizer_with(kind: str, smollm2_dir: Path):
    """(tokenizer, the token that ends an assistant turn) for each template under test."""
    if kind == "byte":
        return build_byte_tokenizer(), "<eos>"
    tokenizer = load_tokenizer(str(smollm2_dir), "<image>")
    if kind == "chatml":
        tokenizer.chat_template = resolve_chat_template("chatml")
    elif kind == "think":
        tokenizer.chat_template = THINK
    elif kind == "llama3":
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
        )
        tokenizer.chat_template = LLAMA3
        return tokenizer, "<|eot_id|>"
    return tokenizer, "<|im_end|>"


def labelled_spans(encoded) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("kind", ["smollm2", "chatml", "llama3", "think", "byte"])
def test_labels_are_exactly_the_assistant_contents_and_their_end_of_turn_token(smollm2_dir, kind):
    tokenizer, end = tokenizer_with(kind, smollm2_dir)
    encoder = TextEncoder(tokenizer, "<image>")
    encoded = encoder.encode_chat(CONVERSATION, IMAGE_TOKENS, "all_assistant_turns")
    spans = labelled_spans(encoded)
    assert [tokenizer.decode(span) for span in spans] == [content + end for content in ASSISTANT]
    assert [tokenizer.decode(span, skip_special_tokens=True) for span in spans] == ASSISTANT
    assert [span[-1] for span in spans] == [tokenizer.convert_tokens_to_ids(end)] * 2
    assert encoded.input_ids.count(encoder.image_token_id) == sum(IMAGE_TOKENS)
    image_runs = "".join("I" if token == encoder.image_token_id else "." for token in encoded.input_ids).split(".")
    assert [len(run) for run in image_runs if run] == IMAGE_TOKENS
    last = labelled_spans(encoder.encode_chat(CONVERSATION, IMAGE_TOKENS, "last_assistant_turn"))
    assert [tokenizer.decode(span) for span in last] == [ASSISTANT[1] + end]
    assert tokenizer.convert_tokens_to_ids(end) in stop_tokens(tokenizer, "<image>")


@pytest.mark.parametrize("kind", ["smollm2", "chatml", "byte"])
def test_the_generation_prompt_is_what_training_saw_before_the_answer(smollm2_dir, kind):
    tokenizer, _ = tokenizer_with(kind, smollm2_dir)
    encoder = TextEncoder(tokenizer, "<image>")
    encoded = encoder.encode_chat(CONVERSATION, IMAGE_TOKENS, "last_assistant_turn")
    prompt = encoder.encode_chat_prompt(CONVERSATION[:4], IMAGE_TOKENS)
    answer_starts = encoded.labels.index(next(label for label in encoded.labels if label != IGNORE_INDEX))
    assert encoded.input_ids[:answer_starts] == prompt


def test_a_template_that_rewrites_history_is_refused_not_mislabelled(smollm2_dir):
    tokenizer = build_byte_tokenizer()
    # the generation prompt differs from how the template writes an assistant turn
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}answer: {% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="does not render turn 3 as a continuation"):
        TextEncoder(tokenizer, "<image>").encode_chat(CONVERSATION, IMAGE_TOKENS, "all_assistant_turns")


def test_a_tokenizer_without_template_asks_for_one(smollm2_dir):
    tokenizer = load_tokenizer(str(smollm2_dir), "<image>")
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="set data.text.chat_template"):
        TextEncoder(tokenizer, "<image>").encode_chat(CONVERSATION, IMAGE_TOKENS, "all_assistant_turns")


def test_chat_templates_resolve_from_a_name_a_file_or_text(tmp_path):
    assert resolve_chat_template(None) is None and resolve_chat_template("chatml") == CHATML
    (tmp_path / "t.jinja").write_text(LLAMA3)
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == LLAMA3 and resolve_chat_template(LLAMA3) == LLAMA3
    with pytest.raises(UserError, match="neither a template, a file, nor one of chatml"):
        resolve_chat_template("chatm")


def test_a_tokenizer_with_begin_and_end_of_image_tokens_wraps_every_image_in_them(tmp_path):
    # Gemma 4's processor writes <|image> + the soft tokens + <image|>; training writes the same for a tokenizer
    # that declares them around its own image token, in conversations as in prompts
    from helpers import GEMMA4_IMAGE_TOKENS, gemma4_tokenizer

    tokenizer = load_tokenizer(str(gemma4_tokenizer(tmp_path / "gemma4")), GEMMA4_IMAGE_TOKENS["image_token"])
    encoder = TextEncoder(tokenizer, GEMMA4_IMAGE_TOKENS["image_token"])
    boi, image, eoi = (tokenizer.convert_tokens_to_ids(GEMMA4_IMAGE_TOKENS[n]) for n in ("boi_token", "image_token", "eoi_token"))
    encoded = encoder.encode_chat(CONVERSATION, IMAGE_TOKENS, "all_assistant_turns")
    ids = encoded.input_ids
    spans = [ids[start : ids.index(eoi, start) + 1] for start, token in enumerate(ids) if token == boi]
    assert spans == [[boi, *[image] * count, eoi] for count in IMAGE_TOKENS]
    assert all(label == IGNORE_INDEX for label, token in zip(encoded.labels, ids, strict=True) if token in (boi, eoi))
    # what a sample costs counts the bounds: its text measured without images, plus its images' tokens
    unexpanded = encoder.encode_chat(CONVERSATION, [0, 0, 0], "all_assistant_turns").input_ids
    assert len(ids) == len(unexpanded) + sum(IMAGE_TOKENS) and unexpanded.count(boi) == 3
    # with another image token the tokenizer's bounds are not used
    other = TextEncoder(load_tokenizer(str(tmp_path / "gemma4"), "<image>"), "<image>")
    assert boi not in other.encode_chat(CONVERSATION, IMAGE_TOKENS, "all_assistant_turns").input_ids
