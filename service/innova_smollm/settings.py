"""Service settings: read from the environment once, at the entry point, into one frozen object.

Nothing else in the package reads ``os.environ``. Every variable is parsed and checked here, and a bad value stops
start-up with a :class:`SettingsError` that names the variable, the value and what would be accepted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from innova_smollm.errors import SettingsError

#: The embedded default model, fetched by ``scripts/fetch_model.py`` into ``models/`` (relative to BACKEND_ROOT).
DEFAULT_MODEL_PATH = "models/SmolLM2-135M-Instruct.Q4_1.gguf"

#: SMOLLM_PARALLEL's default, chosen for the production model class (a 2 GB 3B model on a 2-8 core host), see
#: docs/performance.md: on a Llama-3.2-3B-shaped Q4_K_M on 2 cores, 4 clients were served 1.57x faster with 4
#: sequences than with 1 (11.9 against 7.6 tok/s), one client no slower, and with the shared KV layout that
#: ``auto`` picks for such a model, 4 sequences cost no more KV memory than 1.
DEFAULT_PARALLEL = 4

#: Model backends chosen by the model file's suffix. llama.cpp is the only one today.
BACKENDS_BY_SUFFIX = {".gguf": "llama.cpp"}


class Provider(StrEnum):
    LOCAL = "local"
    ECHO = "echo"


class Fallback(StrEnum):
    NONE = "none"
    ECHO = "echo"


class FlashAttention(StrEnum):
    #: On with GPU offload, and on the CPU where several sequences share the KV cache (SMOLLM_PARALLEL above 1);
    #: off on the CPU for one sequence. Why: llama.cpp's plain attention multiplies every query by every cell of the
    #: cache, other sequences' cells and idle cached prompts included, and masks them afterwards, while the CPU
    #: flash-attention kernel skips masked cells; alone, the plain kernel is faster at long contexts
    #: (scripts/bench_attention.py; figures in docs/performance.md).
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class KVLayout(StrEnum):
    """How the engine lays out its KV cache for SMOLLM_PARALLEL sequences; see engine/kv_cache.py."""

    #: per_sequence when its extra KV memory, (parallel - 1) x one window's cache, is at most
    #: engine.kv_cache.PER_SEQUENCE_EXTRA_KV_BYTES (512 MiB), else shared: the speed where it is cheap (a small
    #: model or a short window), one window's memory where it is not (a 3B model at 4096 tokens and 4 sequences
    #: would need 1.3 GiB more).
    AUTO = "auto"
    #: One pool of n_ctx cells for all sequences: the memory of one request's cache, and jobs wait for free cells.
    SHARED = "shared"
    #: One stream of n_ctx cells per sequence: parallel times the KV memory, and attention spans only a sequence's
    #: own cells, which decodes several sequences faster.
    PER_SEQUENCE = "per_sequence"


class WarmKind(StrEnum):
    #: A chat's system prompt: warmed is what every conversation starting with it shares once the chat template has
    #: rendered it (the template's header, the system message, the start of the first user turn).
    SYSTEM = "system"
    #: Raw text that prompts of /generate and /v1/completions start with, tokenized as those prompts are.
    TEXT = "text"


@dataclass(frozen=True)
class WarmPrompt:
    """A prompt start decoded at start-up and kept (SMOLLM_WARM_PROMPTS), so a request beginning with it decodes only
    what follows; see engine/scheduler.py ``GGUFEngine`` and docs/operations.md."""

    kind: WarmKind
    text: str


@dataclass(frozen=True, kw_only=True)
class Settings:
    enabled: bool = True
    provider: Provider = Provider.LOCAL
    model_path: Path = Path(DEFAULT_MODEL_PATH)
    backend: str = "llama.cpp"
    n_ctx: int = 4096
    n_threads: int = 1
    #: Let the engine decode with fewer threads while that is faster (CPU contention; see engine/threads.py).
    adaptive_threads: bool = True
    n_gpu_layers: int = 0
    flash_attn: FlashAttention = FlashAttention.AUTO
    max_tokens: int = 1024
    max_queue: int = 8
    #: How many requests decode together in one llama.cpp batch (DEFAULT_PARALLEL); 1 is the same engine with one
    #: sequence, serving requests strictly one after another.
    parallel: int = DEFAULT_PARALLEL
    #: Keep each finished sequence's tokens in the KV cache so a prompt sharing its prefix is not decoded again.
    prompt_cache: bool = True
    #: Host memory for KV states saved from sequences whose cells a new job takes over, restored when a later prompt
    #: starts the same way (with the prompt cache on; 0: none). See engine/saved_states.py.
    prompt_cache_mb: int = 256
    kv_layout: KVLayout = KVLayout.AUTO
    #: Prompt starts decoded at start-up and kept for the life of the process, read from the JSON file that
    #: SMOLLM_WARM_PROMPTS names (a list of ``{"system": text}`` and ``{"text": text}``). Health says ``loading``
    #: until they are decoded. Their KV states count against ``prompt_cache_mb``.
    warm_prompts: tuple[WarmPrompt, ...] = ()
    #: Map the model file instead of reading it into memory. Off by default: llama.cpp repacks the Q4_K weights into
    #: a copy for its CPU kernels, and with the file mapped both stay resident, so a 2 GB model held 3.8 GB (the
    #: production-shaped model: 1.28 GB more than read, at the same CPU per token; docs/performance.md).
    use_mmap: bool = False
    request_timeout_s: float = 300.0
    fallback: Fallback = Fallback.NONE
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    allow_insecure_listen: bool = False
    #: Largest accepted request body; past it the answer is 413.
    max_body_bytes: int = 1_048_576
    max_messages: int = 512
    max_stop_sequences: int = 16
    #: Logging prompt and answer text is off unless an operator asks for it.
    log_content: bool = False
    log_level: str = "INFO"
    #: How long a SIGTERM waits for running requests before the process exits.
    drain_timeout_s: float = 30.0
    #: A connection must send a whole request head (request line and headers) within this many seconds of opening,
    #: or of the first byte of its next request; else it gets a JSON 408 and is closed (http/connections.py).
    head_timeout_s: float = 10.0
    #: Longest pause allowed inside a request body, and longest an answer may wait for a client that takes no byte
    #: of it; past it the connection is closed (a stalled body gets a JSON 408 first).
    io_timeout_s: float = 30.0
    #: Seconds an idle keep-alive connection stays open between requests (uvicorn's ``timeout_keep_alive``).
    keep_alive_s: int = 5
    #: HTTP requests handled at once, health and metrics not counted; past it a JSON 503 with Retry-After. The
    #: default, max(64, 4 x (parallel + max_queue)), leaves room above what the engine admits for the cheap routes.
    max_requests: int = 64

    #: JSON record of the deployed models (current and previous: name, sha256, when), written by the innova_model
    #: role; /info shows it. Empty: none.
    model_manifest: Path | None = None

    @property
    def model_name(self) -> str:
        return display_name(self.model_path)

    def flash_attention_for(self, n_gpu_layers: int, *, several_sequences: bool) -> bool:
        """Whether llama.cpp should use flash attention once ``n_gpu_layers`` layers are actually offloaded, for a
        context that decodes several sequences together (SMOLLM_PARALLEL above 1, either KV layout) or one."""
        if self.flash_attn is FlashAttention.AUTO:
            return n_gpu_layers != 0 or several_sequences
        return self.flash_attn is FlashAttention.ON

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        backend_root = Path(env.text("BACKEND_ROOT", str(Path.cwd())))
        model_path = _resolve_model_path(env.text("SMOLLM_MODEL_PATH", DEFAULT_MODEL_PATH), backend_root)
        backend = BACKENDS_BY_SUFFIX.get(model_path.suffix.lower())
        if backend is None:
            known = ", ".join(f"{suffix} ({name})" for suffix, name in BACKENDS_BY_SUFFIX.items())
            raise SettingsError(
                f"SMOLLM_MODEL_PATH={str(model_path)!r}: no model backend for the suffix "
                f"{model_path.suffix or '(none)'!r}; known backends by suffix: {known}"
            )
        max_queue = env.integer("SMOLLM_MAX_QUEUE", 8, minimum=0)
        parallel = env.integer("SMOLLM_PARALLEL", DEFAULT_PARALLEL, minimum=1, maximum=64)
        settings = cls(
            enabled=env.boolean("ENABLE_SMOLLM", True),
            provider=env.choice("PROVIDER", Provider, Provider.LOCAL),
            model_path=model_path,
            backend=backend,
            n_ctx=env.integer("SMOLLM_N_CTX", 4096, minimum=64),
            n_threads=env.integer("SMOLLM_N_THREADS", _usable_cpu_count(), minimum=1),
            adaptive_threads=env.boolean("SMOLLM_ADAPTIVE_THREADS", True),
            n_gpu_layers=env.integer("SMOLLM_N_GPU_LAYERS", 0, minimum=-1),
            flash_attn=env.choice("SMOLLM_FLASH_ATTN", FlashAttention, FlashAttention.AUTO),
            max_tokens=env.integer("SMOLLM_MAX_TOKENS", 1024, minimum=1),
            max_queue=max_queue,
            parallel=parallel,
            prompt_cache=env.boolean("SMOLLM_PROMPT_CACHE", True),
            prompt_cache_mb=env.integer("SMOLLM_PROMPT_CACHE_MB", 256, minimum=0),
            use_mmap=env.boolean("SMOLLM_USE_MMAP", False),
            kv_layout=env.choice("SMOLLM_KV_LAYOUT", KVLayout, KVLayout.AUTO),
            warm_prompts=env.warm_prompts("SMOLLM_WARM_PROMPTS"),
            request_timeout_s=env.number("SMOLLM_REQUEST_TIMEOUT_S", 300.0, minimum=0.1),
            fallback=env.choice("SMOLLM_FALLBACK", Fallback, Fallback.NONE),
            host=env.host("HOST", "127.0.0.1"),
            port=env.integer("PORT", 8000, minimum=1, maximum=65535),
            api_keys=env.keys("SMOLLM_API_KEYS"),
            allow_insecure_listen=env.boolean("SMOLLM_ALLOW_INSECURE_LISTEN", False),
            max_body_bytes=env.integer("SMOLLM_MAX_BODY_BYTES", 1_048_576, minimum=1024),
            max_messages=env.integer("SMOLLM_MAX_MESSAGES", 512, minimum=1),
            max_stop_sequences=env.integer("SMOLLM_MAX_STOP", 16, minimum=0),
            log_content=env.boolean("SMOLLM_LOG_CONTENT", False),
            log_level=env.choice_text("SMOLLM_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
            drain_timeout_s=env.number("SMOLLM_DRAIN_TIMEOUT_S", 30.0, minimum=0.0),
            head_timeout_s=env.number("SMOLLM_HEAD_TIMEOUT_S", 10.0, minimum=0.1),
            io_timeout_s=env.number("SMOLLM_IO_TIMEOUT_S", 30.0, minimum=0.1),
            keep_alive_s=env.integer("SMOLLM_KEEP_ALIVE_S", 5, minimum=1, maximum=3600),
            max_requests=env.integer("SMOLLM_MAX_REQUESTS", default_max_requests(parallel, max_queue), minimum=1),
            model_manifest=Path(manifest) if (manifest := env.text("SMOLLM_MODEL_MANIFEST", "")) else None,
        )
        settings.check_listen_address()
        settings.check_warm_prompts()
        return settings

    def check_warm_prompts(self) -> None:
        """Warm prompts are kept as saved states of the prompt cache: without it they could not be kept."""
        if self.warm_prompts and not (self.prompt_cache and self.prompt_cache_mb > 0):
            raise SettingsError(
                "SMOLLM_WARM_PROMPTS needs the prompt cache, which keeps their KV states: set SMOLLM_PROMPT_CACHE=true "
                "and SMOLLM_PROMPT_CACHE_MB above 0, or unset SMOLLM_WARM_PROMPTS"
            )

    def check_listen_address(self) -> None:
        """Refuse to expose the model beyond this machine without API keys, unless explicitly allowed."""
        if self.api_keys or self.allow_insecure_listen or _is_loopback(self.host):
            return
        raise SettingsError(
            f"HOST={self.host!r} listens beyond loopback but SMOLLM_API_KEYS is empty: set SMOLLM_API_KEYS, "
            "or set SMOLLM_ALLOW_INSECURE_LISTEN=true if something in front of the service authenticates callers"
        )


_VERSION_SUFFIX = re.compile(r"-[0-9a-f]{12}$")


def display_name(model_path: Path) -> str:
    """The model's name for humans: the GGUF file's stem, through symlinks, without a deployment version suffix.

    The innova_model role deploys ``<name>-<first 12 hex of sha256>.gguf`` behind a ``current.gguf`` symlink;
    both the link and the suffix are deployment details, so the name shown is ``<name>``.
    """
    try:
        resolved = model_path.resolve()
    except OSError:
        resolved = model_path
    return _VERSION_SUFFIX.sub("", resolved.stem)


def default_max_requests(parallel: int, max_queue: int) -> int:
    """SMOLLM_MAX_REQUESTS's default: four times what the engine admits (running + waiting), at least 64.

    The engine turns away what it cannot admit with its own 503 ``queue_full`` at once, so most requests past its
    admission leave quickly; the rest of the room is for the routes that cost nothing (info, models, 4xx answers).
    """
    return max(64, 4 * (parallel + max_queue))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _usable_cpu_count() -> int:
    # The CPUs this process may run on (cgroup/affinity aware), not the machine's total.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _resolve_model_path(raw: str, backend_root: Path) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (backend_root / path)


_E = TypeVar("_E", bound=StrEnum)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class _Env:
    """Typed, checked access to environment variables; every error names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SettingsError(f"{name}={raw!r} is not a boolean; use true or false")

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not an integer") from None
        _check_range(name, value, minimum, maximum)
        return value

    def number(self, name: str, default: float, *, minimum: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number") from None
        if not value >= minimum or value == float("inf"):
            raise SettingsError(f"{name}={raw!r} must be a finite number >= {minimum}")
        return value

    def choice(self, name: str, enum: type[_E], default: _E) -> _E:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            return enum(raw.lower())
        except ValueError:
            allowed = " | ".join(member.value for member in enum)
            raise SettingsError(f"{name}={raw!r} is not one of: {allowed}") from None

    def choice_text(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.upper() not in allowed:
            raise SettingsError(f"{name}={raw!r} is not one of: {' | '.join(allowed)}")
        return raw.upper()

    def host(self, name: str, default: str) -> str:
        raw = self._raw(name) or default
        if any(char.isspace() for char in raw) or "/" in raw:
            raise SettingsError(f"{name}={raw!r} is not a host name or IP address")
        return raw

    def keys(self, name: str) -> tuple[str, ...]:
        raw = self._raw(name)
        if raw is None:
            return ()
        keys = tuple(key.strip() for key in raw.split(",") if key.strip())
        if any(len(key) < 16 for key in keys):
            # Never echo a key back: the message names the variable only.
            raise SettingsError(f"{name}: every key must be at least 16 characters long")
        return keys

    def warm_prompts(self, name: str) -> tuple[WarmPrompt, ...]:
        raw = self._raw(name)
        if raw is None:
            return ()
        try:
            document = json.loads(Path(raw).read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{name}={raw!r}: cannot read the file ({exc.strerror or exc})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{name}={raw!r}: the file is not JSON ({exc})") from None
        return parse_warm_prompts(document, where=f"{name}={raw!r}")


def parse_warm_prompts(document: object, *, where: str) -> tuple[WarmPrompt, ...]:
    """The warm prompts of a SMOLLM_WARM_PROMPTS file: a JSON list of ``{"system": text}`` or ``{"text": text}``."""
    shape = 'a JSON list of objects, each {"system": "<system prompt>"} or {"text": "<prompt start>"}'
    if not isinstance(document, list):
        raise SettingsError(f"{where}: the file must hold {shape}")
    prompts = []
    kinds = ", ".join(kind.value for kind in WarmKind)
    for index, entry in enumerate(document):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SettingsError(f"{where}: entry {index} must be an object with one key ({kinds}): {shape}")
        ((key, text),) = entry.items()
        if key not in WarmKind.__members__.values():
            raise SettingsError(f"{where}: entry {index} has the key {key!r}; use one of: {kinds}")
        if not isinstance(text, str) or not text.strip():
            raise SettingsError(f"{where}: entry {index} ({key}) must be a non-empty string")
        prompts.append(WarmPrompt(WarmKind(key), text))
    return tuple(prompts)


def _check_range(name: str, value: int, minimum: int, maximum: int | None) -> None:
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise SettingsError(f"{name}={value} must be >= {minimum}{upper}")
