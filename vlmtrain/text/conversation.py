"""Conversations: the one form in which shards store multi-turn, multi-image samples, the rules a conversation
must follow, and the readers that bring LLaVA and "messages" (TRL, LLaMA-Factory) records into that form.

Stored form, in a shard record's JSON::

    "messages": [{"role": "system" | "user" | "assistant",
                  "content": [{"type": "text", "text": "..."} | {"type": "image"} | {"type": "video"}, ...]}, ...]
    "images":   [{"name": "0.jpg", "width": W, "height": H, "budget": 1120}, ...]
    "videos":   [{"name": "v0.mp4", "width": W, "height": H, "duration": S, "fps": F, "frames": N, ...}
                 | {"images": [{"name": "v1.0.jpg", "width": W, "height": H}, ...], "frames": N}, ...]

The k-th image part of the conversation is ``images[k]``, the k-th video part ``videos[k]``: a video file, or a
video given as its frames (images); an image's (or a video's) ``budget`` is optional (it fixes that image's, or
each of the video's frames', token budget in training, whatever the schedule draws), and so are a video's
``key_frames``, ``[{"time": 4.0, "budget": 1120}, ...]``: the frame at that time (seconds) trains in place of the
sampled frame nearest it, at that budget.
"""

from __future__ import annotations

import re
from typing import Any

from vlmtrain.modeling.geometry import LEVELS

ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MARKER = "<image>"  # where an image goes in the text of LLaVA and messages records
VIDEO_MARKER = "<video>"  # where a video goes (LLaMA-Factory)
UNTRAINED_MARKERS = ("<audio>",)  # LLaMA-Factory's markers for what vlmtrain does not train
UNTRAINED_KEYS = ("audios", "audio")
UNTRAINED_PARTS = ("audio", "audio_url", "input_audio")
UNTRAINED_MEDIA = "vlmtrain trains images, videos and text (no audio yet): leave such records out (--skip-bad)"
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")  # OpenAI, LLaMA-Factory, Llama 3
UNTRAINED_TOOLS = "vlmtrain trains system, user and assistant turns only (no tool calls yet): leave such records out (--skip-bad)"
IMAGE_PART = {"type": "image"}
VIDEO_PART = {"type": "video"}
MEDIA_PARTS = {MARKER: IMAGE_PART, VIDEO_MARKER: VIDEO_PART}
MEDIA_NAMES = {"image": "an image", "video": "a video"}
MEDIA_TYPES = ("image", "image_url", "video", "video_url")  # the content parts that place an image or a video
# qwen-vl-utils' and LLaMA-Factory's per-part sampling and sizing keys, which vlmtrain does not read
UNREAD_PART_KEYS = (
    "fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels", "resized_height",
    "resized_width", "video_start", "video_end",
)
UNREAD_PART_WHY = (
    "vlmtrain sizes images and frames by their token budget and samples videos as the recipe's data.video says: "
    "give a 'budget' (a video's 'key_frames') or leave the key out"
)


class ConversationError(ValueError):
    """A conversation that breaks a rule; the message says which, in a few words."""


def split_markers(text: str) -> list[dict[str, str]]:
    """``text`` as content parts: an image part at each ``<image>`` marker, a video part at each ``<video>``,
    text parts around them. An audio marker is refused (it would otherwise be trained as a word)."""
    for marker in UNTRAINED_MARKERS:
        if marker in text:
            raise ConversationError(f"a {marker} marker: {UNTRAINED_MEDIA}")
    parts: list[dict[str, str]] = []
    for piece in re.split(f"({re.escape(MARKER)}|{re.escape(VIDEO_MARKER)})", text):
        if piece in MEDIA_PARTS:
            parts.append(dict(MEDIA_PARTS[piece]))
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def image_count(messages: list[dict[str, Any]], kind: str = "image") -> int:
    """The image parts (or ``kind`` parts: ``"video"``) of the messages."""
    return sum(part["type"] == kind for message in messages for part in message["content"])


def check_conversation(messages: list[dict[str, Any]], images: int, answered: bool = True, videos: int = 0) -> None:
    """The rules of a stored conversation (see the module docstring) with ``images`` images and ``videos``
    videos; raises :class:`ConversationError`. ``answered=False`` checks a conversation that waits for the
    assistant's answer (no assistant turn needed)."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("no turns")
    for number, message in enumerate(messages, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ConversationError(f"turn {number}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, list) or not all(_is_part(part) for part in content):
            raise ConversationError(f"turn {number}: content must be a list of text, image and video parts")
        if role == "system" and number > 1:
            raise ConversationError(f"turn {number}: a system turn after the first turn")
        for kind, one in MEDIA_NAMES.items():
            if role != "user" and any(part["type"] == kind for part in content):
                raise ConversationError(f"turn {number}: {one} in a turn of the {role} ({kind}s go in user turns)")
        if role == "assistant" and not "".join(part.get("text", "") for part in content).strip():
            raise ConversationError(f"turn {number}: empty assistant turn")
    turns = [message["role"] for message in messages if message["role"] != "system"]
    if not turns or turns[0] != "user":
        raise ConversationError("the first turn is from the assistant (a conversation starts with the user)")
    if answered and "assistant" not in turns:
        raise ConversationError("no assistant turn (nothing to learn)")
    for kind, listed in (("image", images), ("video", videos)):
        placed = image_count(messages, kind)
        if placed != listed:
            unplaced = f" ({MEDIA_NAMES[kind]} listed but never placed)" if placed < listed else ""
            raise ConversationError(f"{placed} {kind} markers for {listed} {kind}s{unplaced}")


def _is_part(part: Any) -> bool:
    if not isinstance(part, dict):
        return False
    if part.get("type") in ("image", "video"):
        return True
    return part.get("type") == "text" and isinstance(part.get("text"), str)


def check_budgets(budgets: list[Any], where: str = "") -> None:
    """Budgets fixed per image (or, ``where`` said, of a video): each one of the five levels, or null (the
    schedule draws it)."""
    for index, budget in enumerate(budgets):
        if budget is not None and (isinstance(budget, bool) or budget not in LEVELS):
            raise ConversationError(
                f"{where or f'image {index + 1}'}: budget {budget!r} is not one of {', '.join(map(str, LEVELS))}"
            )


def video_budgets(value: Any, where: str) -> dict[str, Any]:
    """What a record fixes of a video's budgets (``where`` names it), as its stored entry keeps it: null (nothing),
    a level (every frame's ``budget``), or ``{"budget": level, "key_frames": [{"time": seconds, "budget": level},
    ...]}`` (either key may be left out)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        value = {"budget": value}
    unknown = sorted(set(value) - {"budget", "key_frames"})
    if unknown:
        raise ConversationError(f"{where}: {', '.join(map(repr, unknown))} is not a video budget key ('budget', 'key_frames')")
    fixed = {name: value[name] for name in ("budget", "key_frames") if value.get(name) is not None}
    check_budgets([fixed.get("budget")], where)
    keys = fixed.get("key_frames", [])
    if not isinstance(keys, list) or not all(
        isinstance(key, dict) and set(key) == {"time", "budget"} and isinstance(key["time"], int | float)
        and not isinstance(key["time"], bool) and key["time"] >= 0 for key in keys
    ):
        raise ConversationError(f"{where}: 'key_frames' must list {{'time': seconds >= 0, 'budget': level}}, found {keys!r:.80}")
    check_budgets([key["budget"] for key in keys], f"{where}: a key frame's")
    return fixed


ImageRef = str | dict[str, Any]  # a path, or a Hugging Face image struct carrying its bytes: {"bytes": b"...", "path": name}


def image_ref(value: Any, where: str) -> ImageRef:
    """One image of a record: a path, or the bytes of a Hugging Face image column (``{"bytes", "path"}``, as
    ``datasets`` stores an ``Image`` feature; only the path when the bytes are null)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, bytes) and data:
            return {"bytes": data, "path": path if isinstance(path, str) else ""}
        if data is None and isinstance(path, str) and path:
            return path
    raise ConversationError(f"{where} must be a path or an image with its bytes ({{'bytes': ..., 'path': ...}})")


VideoRef = str | list[str]  # a video file's path, or the paths of a video's frames in order (a video given as images)


def video_ref(value: Any, where: str) -> VideoRef:
    """One video: a video file's path, or a list of its frames' image paths (LLaMA-Factory's nested lists,
    qwen-vl-utils' frame lists)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(frame, str) and frame for frame in value):
        return list(value)
    raise ConversationError(f"{where} must be a video file's path or a list of its frames' image paths, found {value!r:.80}")


def video_refs(value: Any, where: str) -> list[VideoRef]:
    """The videos of a record's key (``where``): one path, a list of videos (each a path or a list of frame
    paths), or null (none)."""
    if value is None:
        return []
    refs = value if isinstance(value, list) else [value]
    return [video_ref(ref, where) for ref in refs]


def image_refs(value: Any, key: str) -> list[ImageRef]:
    """The images of a record's ``key`` (one image, a list, or null: none)."""
    if value is None:
        return []
    refs = value if isinstance(value, list) else [value]
    return [image_ref(ref, f"{key!r}") for ref in refs]


def present(record: dict[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` that the record has and that is not null (a table's missing value)."""
    return next((record[name] for name in names if record.get(name) is not None), None)


def with_system(messages: list[dict[str, Any]], record: dict[str, Any]) -> list[dict[str, Any]]:
    """``messages`` after the record's ``system`` column (ShareGPT, LLaMA-Factory), as their first turn."""
    system = record.get("system")
    if system is None:
        return messages
    if not isinstance(system, str):
        raise ConversationError("'system' must be a text")
    if messages and messages[0].get("role") == "system":
        raise ConversationError("a 'system' column and a system turn: give the system prompt once")
    return [{"role": "system", "content": [{"type": "text", "text": system}] if system else []}, *messages]


# messages, images, budget per image, videos, what is fixed of each video's budgets
Read = tuple[list[dict[str, Any]], list[ImageRef], list[int | None], list[VideoRef], list[dict[str, Any]]]


def from_llava(record: dict[str, Any]) -> Read:
    """A LLaVA/ShareGPT record (``image`` one image or a list, ``videos`` (or ``video``) the same for videos,
    ``conversations`` of ``from``/``value`` turns with ``<image>`` and ``<video>`` markers, optionally a
    ``system`` prompt, ``budgets``, one per image, and ``video_budgets``, one per video) as (stored messages, images,
    budgets, videos, video budgets)."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ConversationError("'conversations' must be a list of turns")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConversationError(f"turn {number}: needs 'from' and a text 'value'")
        messages.append({"role": _role(turn.get("from"), number, LLAVA_ROLES), "content": split_markers(turn["value"])})
    messages = with_system(messages, record)
    images = image_refs(present(record, "image", "images"), "image")
    videos = video_refs(present(record, "videos", "video"), "'videos'")
    check_conversation(messages, len(images), videos=len(videos))
    return messages, images, record_budgets(record, len(images)), videos, record_video_budgets(record, len(videos))


def _role(name: Any, number: int, roles: dict[str, str]) -> str:
    """The stored role of a turn's speaker ``name``; a tool turn is refused with its role named."""
    if name in TOOL_ROLES:
        raise ConversationError(f"turn {number}: a tool turn ({name!r}): {UNTRAINED_TOOLS}")
    if name not in roles:
        raise ConversationError(f"turn {number}: unknown role {name!r} (roles: {', '.join(roles)})")
    return roles[name]


def record_budgets(record: dict[str, Any], images: int, named: list[int | None] | None = None) -> list[int | None]:
    """The budget fixed for each image: the record's ``budgets`` list, or those its image parts ``named``
    when every image is a part, else none (null: the schedule draws it)."""
    budgets = record.get("budgets")
    if named and any(budget is not None for budget in named) and len(named) != images:
        raise ConversationError("budgets in image parts need every image given as a part (or a 'budgets' list)")
    if budgets is None:
        budgets = named if named is not None and len(named) == images else [None] * images
    elif not isinstance(budgets, list) or len(budgets) != images:
        raise ConversationError(f"'budgets' must list one budget (or null) per image ({images})")
    check_budgets(budgets)
    return budgets


def record_video_budgets(record: dict[str, Any], videos: int, named: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """What the record fixes of each video's budgets (:func:`video_budgets`): its ``video_budgets`` list, one entry
    per video, or what its video parts ``named`` (when every video is a part), else nothing."""
    listed = record.get("video_budgets")
    if named and any(named) and len(named) != videos:
        raise ConversationError("budgets in video parts need every video given as a part (or a 'video_budgets' list)")
    if listed is None:
        return named if named is not None and len(named) == videos else [{}] * videos
    if not isinstance(listed, list) or len(listed) != videos:
        entry = "a level, {'budget', 'key_frames'} or null"
        raise ConversationError(f"'video_budgets' must list one entry ({entry}) per video ({videos})")
    if named and any(named):
        raise ConversationError("video budgets are given both in 'video_budgets' and in video parts; give them in one place")
    return [video_budgets(entry, f"video {index + 1}") for index, entry in enumerate(listed)]


def parse_messages(
    turns: Any,
) -> tuple[list[dict[str, Any]], list[int | None], list[ImageRef], list[VideoRef], list[dict[str, Any]]]:
    """``messages`` turns (``role``/``content``, content a string with ``<image>`` and ``<video>`` markers or a
    list of ``{"type": "text" | "image" | "video"}`` parts) as stored messages, with the budget and the image
    that each image part names, if any (``{"type": "image", "image": "a.jpg"}``, OpenAI's ``image_url`` parts,
    LLaMA-Factory v1's ``value``), and the video and budgets each video part names (``{"type": "video", "video":
    "a.mp4", "budget": 70, "key_frames": [...]}``, a list of frame images in place of the file). A table's null keys
    count as absent; a part's sizing or sampling keys (:data:`UNREAD_PART_KEYS`) are refused."""
    if not isinstance(turns, list):
        raise ConversationError("'messages' must be a list of turns")
    messages, part_budgets, part_images, part_videos, part_video_budgets = [], [], [], [], []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or turn.get("content") is None:
            raise ConversationError(f"turn {number}: needs 'role' and 'content'")
        role = _role(turn.get("role"), number, {role: role for role in ROLES})
        if turn.get("tool_calls"):
            raise ConversationError(f"turn {number}: 'tool_calls': {UNTRAINED_TOOLS}")
        content = turn["content"]
        if isinstance(content, str):
            parts = split_markers(content)
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                text = present(part, "text", "value") if kind == "text" else None
                unread = [name for name in UNREAD_PART_KEYS if kind in MEDIA_TYPES and part.get(name) is not None]
                if unread:
                    raise ConversationError(f"turn {number}: a {kind} part's {', '.join(map(repr, unread))}: {UNREAD_PART_WHY}")
                if kind in ("image", "image_url"):
                    parts.append(dict(IMAGE_PART))
                    part_budgets.append(part.get("budget"))
                    image = present(part, "image", "path", "url", "value")
                    if kind == "image_url" and isinstance(part.get("image_url"), dict):
                        image = part["image_url"].get("url")
                    if image is not None:
                        part_images.append(image_ref(image, f"turn {number}: an image part's image"))
                elif kind in ("video", "video_url"):
                    parts.append(dict(VIDEO_PART))
                    fixed = {"budget": part.get("budget"), "key_frames": part.get("key_frames")}
                    part_video_budgets.append(video_budgets(fixed, f"turn {number}: a video part"))
                    video = present(part, "video", "path", "url", "value")
                    if kind == "video_url" and isinstance(part.get("video_url"), dict):
                        video = part["video_url"].get("url")
                    if video is not None:
                        part_videos.append(video_ref(video, f"turn {number}: a video part's video"))
                elif isinstance(text, str):
                    parts += split_markers(text)
                elif kind in UNTRAINED_PARTS:
                    raise ConversationError(f"turn {number}: a {kind!r} part: {UNTRAINED_MEDIA}")
                else:
                    found = repr(part) if not isinstance(part, dict) else f"type {kind!r}" if kind else f"keys {list(part)}"
                    raise ConversationError(
                        f"turn {number}: a content part must be {{'type': 'text', 'text': ...}}, {{'type': 'image', ...}} or "
                        f"{{'type': 'video', ...}}, found {found}"
                    )
        else:
            raise ConversationError(f"turn {number}: content must be a string or a list of parts")
        messages.append({"role": role, "content": parts})
    return messages, part_budgets, part_images, part_videos, part_video_budgets


def from_messages(record: dict[str, Any]) -> Read:
    """A "messages" record (:func:`parse_messages`; an ``images`` list, or images in the image parts; budgets
    in image parts or a ``budgets`` list; ``videos`` and their budgets the same way; a ``system`` column) as
    (stored messages, images, budget per image, videos, video budgets)."""
    messages, part_budgets, part_images, part_videos, part_video_budgets = parse_messages(record.get("messages"))
    messages = with_system(messages, record)
    images = image_refs(record.get("images"), "images")
    if not images and part_images:
        images = part_images
    elif images and part_images:
        raise ConversationError("images are named both in 'images' and in image parts; name them in one place")
    videos = video_refs(present(record, "videos", "video"), "'videos'")
    if videos and part_videos:
        raise ConversationError("videos are named both in 'videos' and in video parts; name them in one place")
    videos = videos or part_videos
    check_conversation(messages, len(images), videos=len(videos))
    fixed = record_video_budgets(record, len(videos), part_video_budgets)
    return messages, images, record_budgets(record, len(images), part_budgets), videos, fixed


def as_template_messages(messages: list[dict[str, Any]], image_token: str) -> list[dict[str, str]]:
    """Stored messages (videos expanded into frames: :func:`vlmtrain.data.samples.with_frames`) as chat
    templates take them: content one string, each image part as ``image_token``."""
    return [
        {
            "role": message["role"],
            "content": "".join(image_token if part["type"] == "image" else part["text"] for part in message["content"]),
        }
        for message in messages
    ]


def text_of(message: dict[str, Any]) -> str:
    """The text of a stored message (its image parts left out)."""
    return "".join(part.get("text", "") for part in message["content"])
