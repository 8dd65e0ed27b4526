"""A fake Telegram Bot API server on 127.0.0.1, for running a real PTB ``Application``:
the tests' Telegram, and ``python -m bot bench telegram``'s.

Point the application at it with ``ApplicationBuilder().token(fake.token)
.base_url(fake.base_url).base_file_url(fake.base_file_url)``. The test builds incoming
updates (``text_message``, ``command``, ``photo_message``, ``album``, ``document_message``,
``callback_query``: each returns the Update JSON and stores its message, so replies and
button presses can point at it), hands them over with ``push``, and then asserts on what
the bot did: ``calls`` (every request with its parameters and monotonic time),
``bot_messages`` (the current text, buttons and edit history of each message the bot
sent), ``max_per_window`` (flood limits) and ``wait_for`` (await a condition instead of
sleeping). Faults are injected with ``flood`` (429 with ``retry_after``) and ``fail``.

To simulate a redelivery, build an update with ``update_id=`` of an earlier one and push
it before a fresh ``Application`` starts polling; pushed while a poller has confirmed
past that id, it is dropped at the next poll, as Telegram never re-sends a confirmed one.

Faithful to Telegram (these are the behaviours a bot gets wrong):

- Requests: POST to ``/bot<TOKEN>/<method>`` (method names case-insensitive), form or
  multipart, non-string values JSON-encoded. A wrong token is a 401, an unknown method a
  404; answers are ``{"ok": ..., "result" | "error_code", "description", "parameters"}``.
- ``getUpdates`` long polling: returns pending updates at once or waits up to ``timeout``;
  an ``offset`` confirms (forgets) every update below it, so unconfirmed updates are
  delivered again (a fresh ``Application`` starts with no offset and gets them). A second
  ``getUpdates`` ends a waiting one with 409 Conflict, and so does an active webhook.
- Message ids count up per chat, shared by incoming and outgoing messages. Incoming text
  gets ``bot_command`` and ``mention`` entities the way Telegram derives them, with
  offsets in UTF-16 code units. ``photo`` is a list of sizes, smallest first.
- Errors, with Telegram's descriptions: chat not found, message text is empty, message is
  too long (4096), message caption is too long (1024), can't parse entities (HTML),
  message to be replied not found, message to edit not found, message can't be edited,
  message is not modified (same text, entities and inline keyboard), BUTTON_DATA_INVALID
  (callback data over 64 bytes), wrong parameter action, invalid file_id, file is too big
  (``getFile`` over 20 MB), IMAGE_PROCESS_FAILED, PHOTO_INVALID_DIMENSIONS, a callback
  query answered twice or never sent.
- ``editMessageText`` / ``editMessageCaption`` without ``reply_markup`` remove the inline
  keyboard, as Telegram does.

Simplified:

- One bot per server; no privacy mode, no membership: the test decides what the bot
  receives, and the bot may write to any chat the fake has seen (builders or ``add_chat``).
- ``parse_mode="HTML"`` is parsed (tags checked, text and entities stored as Telegram
  returns them); Markdown and MarkdownV2 are stored verbatim and not checked. Length
  limits count code points.
- A sent or pushed photo keeps its exact bytes as the largest size (Telegram re-encodes
  to JPEG) plus one real 90-pixel JPEG thumbnail. URLs are never fetched: sending a photo
  or document by URL is a 400. Photos over 10 MB are refused with a 400
  (``PHOTO_SAVE_FILE_INVALID``); uploads over 50 MB get aiohttp's 413.
- ``allowed_updates`` is recorded, not applied; inline mode, albums sent by the bot,
  topics and business connections are not implemented (an unknown method is a 404).
- No flood control of its own: inject 429s with ``flood`` and assert rates with
  ``max_per_window``.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import PurePosixPath
from types import TracebackType
from typing import Any, Literal, TypeVar

from aiohttp import web
from PIL import Image

JSON = dict[str, Any]
T = TypeVar("T")

MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_DOWNLOAD = 20 * 1024 * 1024
MAX_PHOTO_UPLOAD = 10 * 1024 * 1024
MAX_UPLOAD = 50 * 1024 * 1024
THUMBNAIL_SIDE = 90

# The methods whose successful calls put a message (or a change to one) in front of users:
# what Telegram's flood limits (about 1 per second per chat, 20 per minute per group) count.
MESSAGE_METHODS = frozenset(
    [
        "sendMessage",
        "sendPhoto",
        "sendDocument",
        "editMessageText",
        "editMessageCaption",
        "editMessageReplyMarkup",
    ]
)
MEMBER_STATUSES = ("creator", "administrator", "member", "left")
CHAT_ACTIONS = frozenset(
    [
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    ]
)
# Parameters that PTB sends as plain strings; every other value arrives JSON-encoded.
_TEXT_PARAMS = frozenset(
    [
        "text",
        "caption",
        "parse_mode",
        "action",
        "callback_query_id",
        "file_id",
        "url",
        "secret_token",
        "language_code",
        "inline_message_id",
        "photo",
        "document",
    ]
)
_NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)
_COMMAND = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{5,32})?(?![\w@])")
_MENTION = re.compile(r"(?<![\w@/])@[A-Za-z0-9_]{5,32}(?!\w)")
_TAG = re.compile(r"<(/?)([a-zA-Z][\w-]*)((?:\s+[\w-]+(?:=\"[^\"]*\"|='[^']*')?)*)\s*>")
_HREF = re.compile(r"href=[\"']([^\"']*)")
_HTML_ENTITY_TYPES = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "span": "spoiler",
    "tg-spoiler": "spoiler",
    "a": "text_link",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}


@dataclass(frozen=True)
class User:
    """A Telegram user (or the bot itself)."""

    id: int
    first_name: str
    username: str | None = None
    is_bot: bool = False

    def to_json(self) -> JSON:
        out: JSON = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.username:
            out["username"] = self.username
        return out


@dataclass(frozen=True)
class Chat:
    """A chat: private chats have the user's (positive) id, groups a negative one."""

    id: int
    type: Literal["private", "group", "supergroup"]
    title: str | None = None
    first_name: str | None = None
    username: str | None = None

    def __post_init__(self) -> None:
        if (self.type == "private") != (self.id > 0):
            raise ValueError(f"a {self.type} chat cannot have id {self.id}")
        if self.type != "private" and not self.title:
            raise ValueError("a group needs a title")

    @classmethod
    def private(cls, user: User) -> Chat:
        return cls(user.id, "private", first_name=user.first_name, username=user.username)

    def to_json(self) -> JSON:
        out: JSON = {"id": self.id, "type": self.type}
        for key in ("title", "first_name", "username"):
            if value := getattr(self, key):
                out[key] = value
        return out


@dataclass(frozen=True)
class Upload:
    """One file part of a multipart request."""

    filename: str | None
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Call:
    """One request the bot made, as the fake received and answered it."""

    method: str
    token: str
    params: JSON
    files: dict[str, Upload]
    chat_id: int | str | None
    at: float  # time.monotonic() on arrival
    status: int
    result: Any = None
    description: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class StoredFile:
    """A file Telegram holds: served by ``getFile`` and ``/file/bot<TOKEN>/<file_path>``.

    ``file_size`` may exceed ``len(data)``, to stand for a file too big to download.
    """

    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes
    file_size: int
    width: int | None = None
    height: int | None = None
    file_name: str | None = None
    mime_type: str | None = None

    def photo_size(self) -> JSON:
        return {
            "file_id": self.file_id,
            "file_unique_id": self.file_unique_id,
            "width": self.width,
            "height": self.height,
            "file_size": self.file_size,
        }

    def document(self) -> JSON:
        out: JSON = {
            "file_id": self.file_id,
            "file_unique_id": self.file_unique_id,
            "file_size": self.file_size,
        }
        if self.file_name:
            out["file_name"] = self.file_name
        if self.mime_type:
            out["mime_type"] = self.mime_type
        return out


@dataclass(frozen=True)
class Revision:
    """The content of a message after its sending or one edit."""

    text: str | None  # text, or caption for media, as Telegram returns it (HTML parsed)
    entities: tuple[JSON, ...]
    reply_markup: JSON | None  # the inline keyboard, or None
    parse_mode: str | None
    at: float  # time.monotonic()


@dataclass
class StoredMessage:
    """A message in a chat, incoming or sent by the bot, with every revision of it."""

    chat: Chat
    message_id: int
    sender: User
    date: int
    kind: Literal["text", "photo", "document"]
    revisions: list[Revision]
    files: list[StoredFile] = field(default_factory=list)  # photo sizes, smallest first
    reply_to: StoredMessage | None = None
    force_reply: bool = False
    media_group_id: str | None = None
    edit_date: int | None = None
    deleted: bool = False

    @property
    def chat_id(self) -> int:
        return self.chat.id

    @property
    def from_bot(self) -> bool:
        return self.sender.is_bot

    @property
    def text(self) -> str | None:
        """The current text, or the caption of a photo or document."""
        return self.revisions[-1].text

    @property
    def history(self) -> list[str | None]:
        """Every text the message has had, the current one last."""
        return [revision.text for revision in self.revisions]

    @property
    def entities(self) -> list[JSON]:
        return list(self.revisions[-1].entities)

    @property
    def parse_mode(self) -> str | None:
        return self.revisions[-1].parse_mode

    @property
    def reply_markup(self) -> JSON | None:
        return self.revisions[-1].reply_markup

    @property
    def buttons(self) -> list[list[JSON]]:
        """The rows of the current inline keyboard (empty without one)."""
        markup = self.reply_markup
        return [list(row) for row in markup["inline_keyboard"]] if markup else []

    @property
    def sent_at(self) -> float:
        return self.revisions[0].at

    @property
    def edited_at(self) -> float | None:
        return self.revisions[-1].at if len(self.revisions) > 1 else None

    @property
    def file(self) -> StoredFile | None:
        """The document, or the largest photo size."""
        return self.files[-1] if self.files else None

    def to_json(self, *, with_reply: bool = True) -> JSON:
        """The Message object, as Telegram returns it."""
        current = self.revisions[-1]
        out: JSON = {
            "message_id": self.message_id,
            "from": self.sender.to_json(),
            "chat": self.chat.to_json(),
            "date": self.date,
        }
        prefix = ""
        if self.kind == "photo":
            out["photo"] = [size.photo_size() for size in self.files]
            prefix = "caption_"
        elif self.kind == "document":
            out["document"] = self.files[0].document()
            prefix = "caption_"
        if current.text is not None:
            out["text" if self.kind == "text" else "caption"] = current.text
        if current.entities:
            out[prefix + "entities"] = list(current.entities)
        if current.reply_markup:
            out["reply_markup"] = current.reply_markup
        if self.media_group_id:
            out["media_group_id"] = self.media_group_id
        if self.edit_date is not None:
            out["edit_date"] = self.edit_date
        if with_reply and self.reply_to is not None:
            out["reply_to_message"] = self.reply_to.to_json(with_reply=False)
        return out


@dataclass
class _Fault:
    method: str
    chat_id: int | str | None
    times: int
    error_code: int
    description: str
    retry_after: int | None


class ApiError(Exception):
    """An error answer: raised by a method, turned into ``{"ok": false, ...}``."""

    def __init__(self, error_code: int, description: str, retry_after: int | None = None):
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after


def _bad(description: str) -> ApiError:
    return ApiError(400, f"Bad Request: {description}")


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _derived_entities(text: str) -> list[JSON]:
    """The ``bot_command`` and ``mention`` entities Telegram finds in plain text."""
    found = [("bot_command", m) for m in _COMMAND.finditer(text)]
    found += [("mention", m) for m in _MENTION.finditer(text)]
    entities = [
        {"type": kind, "offset": _utf16_len(text[: m.start()]), "length": _utf16_len(m[0])}
        for kind, m in found
    ]
    return sorted(entities, key=lambda e: e["offset"])


def _parse_html(markup: str) -> tuple[str, list[JSON]]:
    """Text and entities of ``parse_mode="HTML"`` markup; a 400 where Telegram gives one."""
    parts: list[str] = []
    length = 0  # of the text so far, in UTF-16 code units
    open_tags: list[tuple[str, int, str]] = []  # name, offset, attributes
    entities: list[JSON] = []
    pos = 0
    while (start := markup.find("<", pos)) != -1:
        chunk = html.unescape(markup[pos:start])
        parts.append(chunk)
        length += _utf16_len(chunk)
        tag = _TAG.match(markup, start)
        where = len(markup[:start].encode())
        if tag is None or tag[2].lower() not in _HTML_ENTITY_TYPES:
            name = tag[2] if tag else markup[start + 1 : start + 11]
            raise _bad(
                f'can\'t parse entities: Unsupported start tag "{name}" at byte offset {where}'
            )
        name = tag[2].lower()
        if not tag[1]:
            open_tags.append((name, length, tag[3]))
        elif not open_tags or open_tags[-1][0] != name:
            expected = f'"</{open_tags[-1][0]}>"' if open_tags else "no end tag"
            raise _bad(
                f"can't parse entities: Unmatched end tag at byte offset {where}, "
                f'expected {expected}, found "</{name}>"'
            )
        else:
            _, offset, attributes = open_tags.pop()
            if length > offset:
                entity: JSON = {
                    "type": _HTML_ENTITY_TYPES[name],
                    "offset": offset,
                    "length": length - offset,
                }
                if name == "a" and (href := _HREF.search(attributes)):
                    entity["url"] = href[1]
                entities.append(entity)
        pos = tag.end()
    if open_tags:
        raise _bad(
            f"can't parse entities: Can't find end tag corresponding to start tag "
            f'"{open_tags[-1][0]}"'
        )
    parts.append(html.unescape(markup[pos:]))
    return "".join(parts), sorted(entities, key=lambda e: (e["offset"], -e["length"]))


def _image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the image header, or None if Pillow cannot read it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(BytesIO(data)) as image:
                return image.size
        except (OSError, Image.DecompressionBombError):
            return None


def _thumbnail(data: bytes) -> bytes:
    with Image.open(BytesIO(data)) as image:
        small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    out = BytesIO()
    small.save(out, "JPEG", quality=80)
    return out.getvalue()


class FakeTelegram:
    """The fake Bot API server; an async context manager that listens on a free port."""

    def __init__(
        self,
        token: str = "123456:TEST-token",
        *,
        username: str = "CaptionTestBot",
        first_name: str = "Caption Bot",
    ) -> None:
        if not re.fullmatch(r"\d+:[\w-]+", token):
            raise ValueError(f"a bot token looks like 123456:ABC-def, not {token!r}")
        self.token = token
        self.bot = User(int(token.split(":")[0]), first_name, username, is_bot=True)
        self.username = username
        self.webhook_url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._calls: list[Call] = []
        self._faults: list[_Fault] = []
        self._chats: dict[int, Chat] = {}
        self._users: dict[int, User] = {self.bot.id: self.bot}
        self._statuses: dict[tuple[int, int], str] = {}
        self._messages: dict[tuple[int, int], StoredMessage] = {}
        self._last_message_id: dict[int, int] = {}
        self._files: dict[str, StoredFile] = {}
        self._files_by_path: dict[str, StoredFile] = {}
        self._commands: dict[tuple[str, str], list[JSON]] = {}
        self._open_callbacks: set[str] = set()
        self._pending: list[JSON] = []
        self._poll_generation = 0
        self._waiting_polls = 0
        self._closing = False
        self._tick = asyncio.Event()
        self._ids = itertools.count(1)
        self._update_ids = itertools.count(10_000)
        self._methods: dict[str, Callable[[JSON, dict[str, Upload]], Awaitable[Any]]] = {
            "getMe": self._get_me,
            "deleteWebhook": self._delete_webhook,
            "setWebhook": self._set_webhook,
            "getUpdates": self._get_updates,
            "sendMessage": self._send_message,
            "sendPhoto": self._send_photo,
            "sendDocument": self._send_document,
            "editMessageText": self._edit_message_text,
            "editMessageCaption": self._edit_message_caption,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "deleteMessage": self._delete_message,
            "sendChatAction": self._send_chat_action,
            "getFile": self._get_file,
            "setMyCommands": self._set_my_commands,
            "getMyCommands": self._get_my_commands,
            "answerCallbackQuery": self._answer_callback_query,
            "getChatMember": self._get_chat_member,
            "getChat": self._get_chat,
        }
        self._by_lower_name = {name.lower(): name for name in self._methods}

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application(client_max_size=MAX_UPLOAD)
        app.router.add_post("/bot{token}/{method}", self._handle_api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Wake waiting getUpdates calls first, or the server would wait out their timeouts.
        self._closing = True
        self._changed()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- set-up ------------------------------------------------------------------------------

    def add_chat(self, chat: Chat) -> Chat:
        """Make ``chat`` known, so the bot may write to it."""
        self._chats[chat.id] = chat
        return chat

    def set_member_status(self, chat: Chat, user: User, status: str) -> None:
        """What ``getChatMember`` answers for ``user`` in ``chat`` (default "member")."""
        if status not in MEMBER_STATUSES:
            raise ValueError(f"status must be one of {MEMBER_STATUSES}, not {status!r}")
        self.add_chat(chat)
        self._users[user.id] = user
        self._statuses[chat.id, user.id] = status

    def flood(
        self, method: str, retry_after: int, *, times: int = 1, chat_id: int | None = None
    ) -> None:
        """Answer the next ``times`` calls of ``method`` (to ``chat_id``) with a 429."""
        description = f"Too Many Requests: retry after {retry_after}"
        self._add_fault(method, chat_id, times, 429, description, retry_after)

    def fail(
        self,
        method: str,
        error_code: int,
        description: str,
        *,
        times: int = 1,
        chat_id: int | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` (to ``chat_id``) with an error,
        e.g. ``fail("sendMessage", 403, "Forbidden: bot was blocked by the user")``."""
        self._add_fault(method, chat_id, times, error_code, description, None)

    def _add_fault(
        self,
        method: str,
        chat_id: int | None,
        times: int,
        error_code: int,
        description: str,
        retry_after: int | None,
    ) -> None:
        if method not in self._methods:
            raise ValueError(f"the fake has no method {method!r}")
        if times < 1:
            raise ValueError("times must be at least 1")
        self._faults.append(_Fault(method, chat_id, times, error_code, description, retry_after))

    # -- incoming updates --------------------------------------------------------------------

    def push(self, *updates: Mapping[str, Any]) -> None:
        """Queue updates for ``getUpdates`` (kept until an offset confirms them)."""
        self._pending.extend(dict(update) for update in updates)
        self._pending.sort(key=lambda update: update["update_id"])
        self._changed()

    @property
    def polling(self) -> bool:
        """Whether a getUpdates call is waiting for an update right now."""
        return self._waiting_polls > 0

    @property
    def pending(self) -> list[int]:
        """The update ids not yet confirmed by an offset."""
        return [update["update_id"] for update in self._pending]

    def text_message(
        self,
        user: User,
        text: str,
        *,
        chat: Chat | None = None,
        reply_to: StoredMessage | None = None,
        update_id: int | None = None,
    ) -> JSON:
        """A text message from ``user`` (in their private chat unless ``chat`` is given);
        ``@username`` and ``/command`` in the text become entities, as in Telegram."""
        message = self._incoming(user, chat, "text", text, reply_to=reply_to)
        return self._update("message", message.to_json(), update_id)

    def command(
        self,
        user: User,
        name: str,
        args: str = "",
        *,
        chat: Chat | None = None,
        addressed: bool = True,
        update_id: int | None = None,
    ) -> JSON:
        """``/name@BotName args`` (``/name args`` if not ``addressed``)."""
        text = f"/{name}@{self.username}" if addressed else f"/{name}"
        return self.text_message(
            user, f"{text} {args}" if args else text, chat=chat, update_id=update_id
        )

    def photo_message(
        self,
        user: User,
        image: bytes,
        *,
        chat: Chat | None = None,
        caption: str | None = None,
        reply_to: StoredMessage | None = None,
        media_group_id: str | None = None,
        width: int | None = None,
        height: int | None = None,
        update_id: int | None = None,
    ) -> JSON:
        """A photo whose largest size serves ``image`` exactly, with a real 90-pixel JPEG
        thumbnail before it. Pass ``width`` and ``height`` to skip reading the image (then
        there is one size and ``image`` may be anything)."""
        if width is None or height is None:
            if _image_size(image) is None:
                raise ValueError("Pillow cannot read the image: pass width= and height=")
            files = self._photo_files(image)
        else:
            files = [self._store_file("photos", image, len(image), width=width, height=height)]
        message = self._incoming(
            user,
            chat,
            "photo",
            caption,
            reply_to=reply_to,
            files=files,
            media_group_id=media_group_id,
        )
        return self._update("message", message.to_json(), update_id)

    def album(
        self,
        user: User,
        images: Sequence[bytes],
        *,
        chat: Chat | None = None,
        caption: str | None = None,
    ) -> list[JSON]:
        """Photo messages sharing a media_group_id; the caption goes on the first."""
        if len(images) < 2:
            raise ValueError("an album has at least two photos")
        group = f"1{next(self._ids):017d}"
        return [
            self.photo_message(
                user, image, chat=chat, caption=caption if i == 0 else None, media_group_id=group
            )
            for i, image in enumerate(images)
        ]

    def document_message(
        self,
        user: User,
        data: bytes,
        *,
        file_name: str,
        mime_type: str,
        file_size: int | None = None,
        chat: Chat | None = None,
        caption: str | None = None,
        reply_to: StoredMessage | None = None,
        update_id: int | None = None,
    ) -> JSON:
        """A document; ``file_size`` may claim more than ``len(data)`` (say 25 MB, which
        ``getFile`` then refuses) without the test holding that many bytes."""
        size = len(data) if file_size is None else file_size
        stored = self._store_file("documents", data, size, file_name=file_name, mime_type=mime_type)
        message = self._incoming(user, chat, "document", caption, reply_to=reply_to, files=[stored])
        return self._update("message", message.to_json(), update_id)

    def callback_query(
        self, user: User, message: StoredMessage, data: str, *, update_id: int | None = None
    ) -> JSON:
        """A press on the button with callback ``data`` under one of the bot's messages."""
        pressable = {button.get("callback_data") for row in message.buttons for button in row}
        if message.deleted or data not in pressable:
            raise ValueError(f"message {message.message_id} has no button with data {data!r}")
        self._users[user.id] = user
        query_id = str(next(self._ids))
        self._open_callbacks.add(query_id)
        query = {
            "id": query_id,
            "from": user.to_json(),
            "message": message.to_json(),
            "chat_instance": f"instance{message.chat_id}",
            "data": data,
        }
        return self._update("callback_query", query, update_id)

    def _update(self, kind: str, payload: JSON, update_id: int | None) -> JSON:
        return {
            "update_id": next(self._update_ids) if update_id is None else update_id,
            kind: payload,
        }

    def _incoming(
        self,
        user: User,
        chat: Chat | None,
        kind: Literal["text", "photo", "document"],
        text: str | None,
        *,
        reply_to: StoredMessage | None,
        files: list[StoredFile] | None = None,
        media_group_id: str | None = None,
    ) -> StoredMessage:
        self._users[user.id] = user
        chat = self.add_chat(chat or Chat.private(user))
        if reply_to is not None and reply_to.chat_id != chat.id:
            raise ValueError("a reply must be in the chat of the message it answers")
        entities = tuple(_derived_entities(text)) if text else ()
        message = StoredMessage(
            chat=chat,
            message_id=self._next_message_id(chat.id),
            sender=user,
            date=int(time.time()),
            kind=kind,
            revisions=[Revision(text, entities, None, None, time.monotonic())],
            files=files or [],
            reply_to=reply_to,
            media_group_id=media_group_id,
        )
        self._messages[chat.id, message.message_id] = message
        return message

    def _next_message_id(self, chat_id: int) -> int:
        self._last_message_id[chat_id] = self._last_message_id.get(chat_id, 0) + 1
        return self._last_message_id[chat_id]

    def _store_file(self, folder: str, data: bytes, file_size: int, **meta: Any) -> StoredFile:
        n = next(self._ids)
        suffix = (
            PurePosixPath(meta.get("file_name") or "").suffix if folder == "documents" else ".jpg"
        )
        stored = StoredFile(
            file_id=f"FILE{n:06d}",
            file_unique_id=f"U{n:06d}",
            file_path=f"{folder}/file_{n}{suffix}",
            data=data,
            file_size=file_size,
            **meta,
        )
        self._files[stored.file_id] = stored
        self._files_by_path[stored.file_path] = stored
        return stored

    def _photo_files(self, image: bytes) -> list[StoredFile]:
        """The photo sizes for readable ``image``, smallest first."""
        width, height = _image_size(image) or (0, 0)
        files = []
        if max(width, height) > THUMBNAIL_SIDE:
            thumb = _thumbnail(image)
            size = _image_size(thumb) or (0, 0)
            files.append(
                self._store_file("photos", thumb, len(thumb), width=size[0], height=size[1])
            )
        files.append(self._store_file("photos", image, len(image), width=width, height=height))
        return files

    # -- assertions --------------------------------------------------------------------------

    def calls(self, method: str | None = None, *, chat_id: int | str | None = None) -> list[Call]:
        """Every request so far, in order of completion, optionally filtered."""
        return [
            call
            for call in self._calls
            if (method is None or call.method == method)
            and (chat_id is None or call.chat_id == chat_id)
        ]

    def message(self, chat_id: int, message_id: int) -> StoredMessage:
        return self._messages[chat_id, message_id]

    def bot_messages(self, chat_id: int | None = None) -> list[StoredMessage]:
        """The messages the bot sent (deleted ones too, flagged), oldest first."""
        return [
            message
            for message in self._messages.values()
            if message.from_bot and (chat_id is None or message.chat_id == chat_id)
        ]

    def last_bot_message(self, chat_id: int) -> StoredMessage:
        sent = self.bot_messages(chat_id)
        if not sent:
            raise AssertionError(f"the bot sent nothing to chat {chat_id}")
        return sent[-1]

    def my_commands(self, scope: JSON | None = None, language_code: str = "") -> list[JSON]:
        """The commands set for ``scope`` (default scope if None) and language."""
        return self._commands.get((self._scope_key(scope), language_code), [])

    def max_per_window(
        self,
        window: float,
        *,
        chat_id: int | None = None,
        methods: Iterable[str] = MESSAGE_METHODS,
    ) -> int:
        """The most successful ``methods`` calls (to ``chat_id``) in any ``window`` seconds."""
        wanted = set(methods)
        times = [
            call.at
            for call in self._calls
            if call.ok and call.method in wanted and (chat_id is None or call.chat_id == chat_id)
        ]
        times.sort()
        most, first = 0, 0
        for last, at in enumerate(times):
            while times[first] <= at - window:
                first += 1
            most = max(most, last - first + 1)
        return most

    async def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float = 5.0,  # noqa: ASYNC109 (a default bound, and a failure that says why)
    ) -> T:
        """Wait until ``predicate()`` is truthy (re-checked after every request and push)
        and return its value; fail the test after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not (result := predicate()):
                    await self._tick.wait()
        except TimeoutError:
            recent = (
                ", ".join(f"{call.method}:{call.status}" for call in self._calls[-8:]) or "none"
            )
            raise AssertionError(
                f"condition not met within {timeout} s; last calls: {recent}"
            ) from None
        return result

    async def wait_for_bot_message(
        self,
        chat_id: int,
        contains: str = "",
        timeout: float = 5.0,  # noqa: ASYNC109 (as wait_for)
    ) -> StoredMessage:
        """The first bot message in ``chat_id`` whose current text contains ``contains``."""

        def find() -> StoredMessage | None:
            return next((m for m in self.bot_messages(chat_id) if contains in (m.text or "")), None)

        return await self.wait_for(find, timeout)

    def _changed(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    # -- HTTP --------------------------------------------------------------------------------

    async def _handle_api(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        token = request.match_info["token"]
        sent_name = request.match_info["method"]
        method = self._by_lower_name.get(sent_name.lower(), sent_name)
        params, files = await self._read(request)
        chat_id = params.get("chat_id")
        result: Any = None
        try:
            if token != self.token:
                raise ApiError(401, "Unauthorized")
            if method not in self._methods:
                raise ApiError(404, "Not Found")
            self._raise_fault(method, chat_id)
            result = await self._methods[method](params, files)
        except ApiError as error:
            body: JSON = {
                "ok": False,
                "error_code": error.error_code,
                "description": error.description,
            }
            if error.retry_after is not None:
                body["parameters"] = {"retry_after": error.retry_after}
            self._record(
                Call(
                    method,
                    token,
                    params,
                    files,
                    chat_id,
                    at,
                    error.error_code,
                    description=error.description,
                )
            )
            return web.json_response(body, status=error.error_code)
        self._record(Call(method, token, params, files, chat_id, at, 200, result))
        return web.json_response({"ok": True, "result": result})

    async def _handle_download(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        token = request.match_info["token"]
        path = request.match_info["path"]
        stored = self._files_by_path.get(path)
        status = 401 if token != self.token else 200 if stored else 404
        self._record(Call("download", token, {"file_path": path}, {}, None, at, status))
        if stored is None or status != 200:
            description = "Unauthorized" if status == 401 else "Not Found"
            body = {"ok": False, "error_code": status, "description": description}
            return web.json_response(body, status=status)
        return web.Response(body=stored.data, content_type="application/octet-stream")

    async def _read(self, request: web.Request) -> tuple[JSON, dict[str, Upload]]:
        params: JSON = {}
        files: dict[str, Upload] = {}
        for name, value in (await request.post()).items():
            if isinstance(value, web.FileField):
                files[name] = Upload(value.filename, value.content_type, value.file.read())
            elif name in _TEXT_PARAMS:
                params[name] = str(value)
            else:
                try:
                    params[name] = json.loads(value)
                except ValueError:
                    params[name] = str(value)  # a chat_id like "@channelname"
        return params, files

    def _record(self, call: Call) -> None:
        self._calls.append(call)
        self._changed()

    def _raise_fault(self, method: str, chat_id: object) -> None:
        for fault in self._faults:
            if fault.method == method and fault.chat_id in (None, chat_id):
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                raise ApiError(fault.error_code, fault.description, fault.retry_after)

    # -- methods -----------------------------------------------------------------------------

    async def _get_me(self, p: JSON, files: dict[str, Upload]) -> JSON:
        return {
            **self.bot.to_json(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def _delete_webhook(self, p: JSON, files: dict[str, Upload]) -> bool:
        self.webhook_url = ""
        if p.get("drop_pending_updates"):
            self._pending.clear()
        return True

    async def _set_webhook(self, p: JSON, files: dict[str, Upload]) -> bool:
        self.webhook_url = str(p.get("url", ""))
        if p.get("drop_pending_updates"):
            self._pending.clear()
        return True

    async def _get_updates(self, p: JSON, files: dict[str, Upload]) -> list[JSON]:
        if self.webhook_url:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset = int(p.get("offset", 0))
        if offset > 0:
            self._pending = [u for u in self._pending if u["update_id"] >= offset]
        elif offset < 0:
            self._pending = self._pending[offset:]
        # A newer getUpdates ends this one with a 409, as Telegram does.
        self._poll_generation += 1
        generation = self._poll_generation
        self._changed()
        self._waiting_polls += 1
        try:
            async with asyncio.timeout(float(p.get("timeout", 0))):
                while not (self._pending or self._closing):
                    await self._tick.wait()
                    if self._poll_generation != generation:
                        raise ApiError(
                            409,
                            "Conflict: terminated by other getUpdates request; make sure "
                            "that only one bot instance is running",
                        )
        except TimeoutError:
            pass
        finally:
            self._waiting_polls -= 1
        return self._pending[: int(p.get("limit", 100))]

    async def _send_message(self, p: JSON, files: dict[str, Upload]) -> JSON:
        chat = self._chat(p)
        text, entities = self._formatted(p, "text", MAX_TEXT, required=True)
        return self._send(chat, p, "text", text, entities, [])

    async def _send_photo(self, p: JSON, files: dict[str, Upload]) -> JSON:
        chat = self._chat(p)
        caption, entities = self._formatted(p, "caption", MAX_CAPTION)
        if "photo" in files:
            data = files["photo"].data
            size = _image_size(data)
            if size is None:
                raise _bad("IMAGE_PROCESS_FAILED")
            if len(data) > MAX_PHOTO_UPLOAD:
                raise _bad("PHOTO_SAVE_FILE_INVALID")
            width, height = size
            if width + height > 10_000 or max(width, height) > 20 * min(width, height):
                raise _bad("PHOTO_INVALID_DIMENSIONS")
            stored = self._photo_files(data)
        else:
            stored = [self._known_file(p.get("photo"))]
        return self._send(chat, p, "photo", caption, entities, stored)

    async def _send_document(self, p: JSON, files: dict[str, Upload]) -> JSON:
        chat = self._chat(p)
        caption, entities = self._formatted(p, "caption", MAX_CAPTION)
        if "document" in files:
            upload = files["document"]
            stored = [
                self._store_file(
                    "documents",
                    upload.data,
                    len(upload.data),
                    file_name=upload.filename,
                    mime_type=upload.content_type,
                )
            ]
        else:
            stored = [self._known_file(p.get("document"))]
        return self._send(chat, p, "document", caption, entities, stored)

    async def _edit_message_text(self, p: JSON, files: dict[str, Upload]) -> JSON:
        message = self._editable(p)
        if message.kind != "text":
            raise _bad("there is no text in the message to edit")
        text, entities = self._formatted(p, "text", MAX_TEXT, required=True)
        return self._revise(message, text, entities, p)

    async def _edit_message_caption(self, p: JSON, files: dict[str, Upload]) -> JSON:
        message = self._editable(p)
        if message.kind == "text":
            raise _bad("there is no caption in the message to edit")
        caption, entities = self._formatted(p, "caption", MAX_CAPTION)
        return self._revise(message, caption, entities, p)

    async def _edit_message_reply_markup(self, p: JSON, files: dict[str, Upload]) -> JSON:
        message = self._editable(p)
        current = message.revisions[-1]
        return self._revise(message, current.text, list(current.entities), p, current.parse_mode)

    async def _delete_message(self, p: JSON, files: dict[str, Upload]) -> bool:
        chat = self._chat(p)
        message = self._messages.get((chat.id, int(p.get("message_id", 0))))
        if message is None or message.deleted:
            raise _bad("message to delete not found")
        message.deleted = True
        return True

    async def _send_chat_action(self, p: JSON, files: dict[str, Upload]) -> bool:
        self._chat(p)
        if p.get("action") not in CHAT_ACTIONS:
            raise _bad("wrong parameter action in request")
        return True

    async def _get_file(self, p: JSON, files: dict[str, Upload]) -> JSON:
        stored = self._files.get(str(p.get("file_id")))
        if stored is None:
            raise _bad("invalid file_id")
        if stored.file_size > MAX_DOWNLOAD:
            raise _bad("file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.file_size,
            "file_path": stored.file_path,
        }

    async def _set_my_commands(self, p: JSON, files: dict[str, Upload]) -> bool:
        commands = p.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad("commands must be a list of at most 100 commands")
        for command in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", str(command.get("command", ""))):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad("command description must be 1-256 characters")
        key = (self._scope_key(p.get("scope")), str(p.get("language_code", "")))
        self._commands[key] = commands
        return True

    async def _get_my_commands(self, p: JSON, files: dict[str, Upload]) -> list[JSON]:
        return self.my_commands(p.get("scope"), str(p.get("language_code", "")))

    async def _answer_callback_query(self, p: JSON, files: dict[str, Upload]) -> bool:
        query_id = p.get("callback_query_id")
        if query_id not in self._open_callbacks:
            raise _bad("query is too old and response timeout expired or query ID is invalid")
        self._open_callbacks.discard(query_id)
        return True

    async def _get_chat_member(self, p: JSON, files: dict[str, Upload]) -> JSON:
        chat = self._chat(p)
        user = self._users.get(int(p.get("user_id", 0)))
        if user is None:
            raise _bad("user not found")
        status = self._statuses.get((chat.id, user.id), "member")
        member: JSON = {"status": status, "user": user.to_json()}
        if status == "creator":
            member["is_anonymous"] = False
        elif status == "administrator":
            member |= {
                "can_be_edited": False,
                "is_anonymous": False,
                "can_manage_chat": True,
                "can_delete_messages": True,
                "can_manage_video_chats": False,
                "can_restrict_members": True,
                "can_promote_members": False,
                "can_change_info": False,
                "can_invite_users": True,
                "can_post_stories": False,
                "can_edit_stories": False,
                "can_delete_stories": False,
            }
        return member

    async def _get_chat(self, p: JSON, files: dict[str, Upload]) -> JSON:
        chat = self._chat(p)
        gifts = ("unlimited_gifts", "limited_gifts", "unique_gifts", "premium_subscription")
        return {
            **chat.to_json(),
            "accent_color_id": 0,
            "max_reaction_count": 11,
            "accepted_gift_types": dict.fromkeys((*gifts, "gifts_from_channels"), False),
        }

    # -- method helpers ----------------------------------------------------------------------

    def _chat(self, p: JSON) -> Chat:
        chat_id = p.get("chat_id")
        if isinstance(chat_id, str):
            name = chat_id.removeprefix("@")
            chat = next((c for c in self._chats.values() if c.username == name), None)
        else:
            chat = self._chats.get(int(chat_id or 0))
        if chat is None:
            raise _bad("chat not found")
        return chat

    def _known_file(self, file_id: object) -> StoredFile:
        stored = self._files.get(str(file_id))
        if stored is None:  # also every URL: the fake never fetches
            raise _bad("wrong file identifier/HTTP URL specified")
        return stored

    def _formatted(
        self, p: JSON, key: str, limit: int, *, required: bool = False
    ) -> tuple[str | None, list[JSON]]:
        """Text (or caption) and entities as Telegram would store them."""
        raw = p.get(key)
        if raw is None and not required:
            return None, []
        raw = str(raw or "")
        entities_key = "entities" if key == "text" else "caption_entities"
        if entities_key in p:
            text, entities = raw, list(p[entities_key])
        elif str(p.get("parse_mode", "")).lower() == "html":
            text, entities = _parse_html(raw)
        else:
            text, entities = raw, []
        if required and not text.strip():
            raise _bad("message text is empty")
        if len(text) > limit:
            raise _bad("message is too long" if key == "text" else "message caption is too long")
        return text, entities

    def _inline_keyboard(self, p: JSON) -> JSON | None:
        markup = p.get("reply_markup")
        if not isinstance(markup, dict) or "inline_keyboard" not in markup:
            return None
        for row in markup["inline_keyboard"]:
            for button in row:
                if len(str(button.get("callback_data", "")).encode()) > 64:
                    raise _bad("BUTTON_DATA_INVALID")
        return markup

    def _send(
        self,
        chat: Chat,
        p: JSON,
        kind: Literal["text", "photo", "document"],
        text: str | None,
        entities: list[JSON],
        files: list[StoredFile],
    ) -> JSON:
        markup = p.get("reply_markup")
        message = StoredMessage(
            chat=chat,
            message_id=0,
            sender=self.bot,
            date=int(time.time()),
            kind=kind,
            revisions=[
                Revision(
                    text,
                    tuple(entities),
                    self._inline_keyboard(p),
                    p.get("parse_mode"),
                    time.monotonic(),
                )
            ],
            files=files,
            reply_to=self._reply_target(chat, p),
            force_reply=isinstance(markup, dict) and bool(markup.get("force_reply")),
        )
        # Validation is over: only now does the message take an id.
        message.message_id = self._next_message_id(chat.id)
        self._messages[chat.id, message.message_id] = message
        return message.to_json()

    def _reply_target(self, chat: Chat, p: JSON) -> StoredMessage | None:
        reply = p.get("reply_parameters")
        if reply is None and "reply_to_message_id" in p:
            reply = {
                "message_id": p["reply_to_message_id"],
                "allow_sending_without_reply": p.get("allow_sending_without_reply", False),
            }
        if reply is None:
            return None
        target_chat = reply.get("chat_id", chat.id)
        target = self._messages.get((target_chat, int(reply["message_id"])))
        if target is not None and not target.deleted:
            return target
        if reply.get("allow_sending_without_reply"):
            return None
        raise _bad("message to be replied not found")

    def _editable(self, p: JSON) -> StoredMessage:
        if "inline_message_id" in p:
            raise _bad("the fake does not implement inline messages")
        chat = self._chat(p)
        message = self._messages.get((chat.id, int(p.get("message_id", 0))))
        if message is None or message.deleted:
            raise _bad("message to edit not found")
        if not message.from_bot:
            raise _bad("message can't be edited")
        return message

    def _revise(
        self,
        message: StoredMessage,
        text: str | None,
        entities: list[JSON],
        p: JSON,
        parse_mode: str | None = None,
    ) -> JSON:
        """Apply an edit; without ``reply_markup`` the inline keyboard goes, as in Telegram."""
        current = message.revisions[-1]
        markup = self._inline_keyboard(p)
        if (text, tuple(entities), markup) == (
            current.text,
            current.entities,
            current.reply_markup,
        ):
            raise ApiError(400, _NOT_MODIFIED)
        revision = Revision(
            text, tuple(entities), markup, p.get("parse_mode", parse_mode), time.monotonic()
        )
        message.revisions.append(revision)
        message.edit_date = int(time.time())
        return message.to_json()

    @staticmethod
    def _scope_key(scope: JSON | None) -> str:
        return json.dumps(scope or {"type": "default"}, sort_keys=True)
