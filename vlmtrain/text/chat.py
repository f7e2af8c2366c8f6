"""Chat templates and the spans they label.

The template is the tokenizer's own (``apply_chat_template``), one a recipe gives (a Jinja string, a file,
or ``chatml``), or the byte tokenizer's default. Which tokens an assistant turn owns is found the same way
for every template, without ``{% generation %}`` markers: the conversation is rendered up to each
assistant turn (with the generation prompt) and through it; the text between the two is that turn, of
which its content and its end-of-turn token are labelled, the rest (role headers, newlines) not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from vlmtrain.errors import UserError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render, or renders in a way no span can be found in."""


def resolve_chat_template(spec: str | None) -> str | None:
    """The Jinja text a recipe's ``data.text.chat_template`` names: None (the tokenizer's own), a built-in
    name (``chatml``), a path to a template file, or the template itself."""
    if spec is None or spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES.get(spec)
    if "{" not in spec:  # a template has Jinja tags; anything else names a file
        path = Path(spec)
        if not path.is_file():
            names = ", ".join(NAMED_TEMPLATES)
            raise UserError(f"data.text.chat_template: {spec!r} is neither a template, a file, nor one of {names}")
        return path.read_text()
    return spec


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation and whether its tokens are labelled (trained on)."""

    text: str
    labelled: bool


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The conversation as the tokenizer's chat template writes it (text, not tokens)."""
    if tokenizer.chat_template is None:
        raise ChatTemplateError("the tokenizer has no chat template; set data.text.chat_template (Jinja text, a file, or chatml)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # Jinja and templates raise their own errors (e.g. "roles must alternate")
        raise ChatTemplateError(f"the chat template cannot render this conversation: {error}") from None


def end_of_turn(tokenizer: PreTrainedTokenizerBase, text: str, image_token: str) -> str:
    """The special token that ends an assistant turn: the first one in ``text`` (what follows the turn's
    content), or "" when the template writes none."""
    specials = [token for token in tokenizer.all_special_tokens if token and token != image_token]
    found = [(text.find(token), -len(token), token) for token in specials if token in text]
    return min(found)[2] if found else ""


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], image_token: str, train_on: str
) -> list[Segment]:
    """The rendered conversation cut into labelled and unlabelled segments (see the module docstring).

    ``train_on`` is ``all_assistant_turns`` or ``last_assistant_turn``. Raises :class:`ChatTemplateError`
    when the template renders a shorter conversation as something other than a prefix of the longer one
    (no span can then be told apart), or when an assistant turn's content is not in its span."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    assistant = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    trained = set(assistant if train_on == "all_assistant_turns" else assistant[-1:])
    segments: list[Segment] = []
    done = 0
    for index in assistant:
        before = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"the chat template does not render turn {index + 1} as a continuation of the turns "
                "before it; give data.text.chat_template one that does"
            )
        span = through[len(before) :]
        content = messages[index]["content"]
        at = span.find(content)
        if at < 0:
            raise ChatTemplateError(f"the chat template changes the content of assistant turn {index + 1}: it cannot be labelled")
        ends = at + len(content)
        eot = end_of_turn(tokenizer, span[ends:], image_token)
        labelled_end = ends + span[ends:].find(eot) + len(eot) if eot else ends
        if index in trained:
            segments += [Segment(full[done : len(before) + at], False), Segment(span[at:labelled_end], True)]
            done = len(before) + labelled_end
    segments.append(Segment(full[done:], False))
    return [segment for segment in segments if segment.text]


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text a model continues to answer ``messages``: the conversation and the assistant's header."""
    return render(tokenizer, messages, add_generation_prompt=True)


def stop_tokens(tokenizer: PreTrainedTokenizerBase, image_token: str) -> list[int]:
    """Token ids that end an assistant turn in this tokenizer's template (and its eos): where generation stops."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        span = render(tokenizer, probe, False)[len(render(tokenizer, probe[:1], True)) :]
    except ChatTemplateError:
        return ids
    token = end_of_turn(tokenizer, span[span.find("a") + 1 :], image_token)
    if token:
        ids.append(tokenizer.convert_tokens_to_ids(token))
    return sorted(set(ids))
