"""A GGUF file opened for what the engine needs besides decoding: tokens, the chat template, a description.

The weights are loaded once, through llama.cpp's model API alone (``llama_model_load_from_file``): no llama
context is made here, so the only context in the process is the one the engine decodes with
(:mod:`innova_smollm.engine.scheduler`). ``llama_cpp.Llama`` would make a second one, with compute buffers of its own.

Also the pre-flight check of a model path that needs no llama.cpp (exists, readable, GGUF magic), which gives an
operator the resolved path and what its directory holds.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format

from innova_smollm.core.memory_budget import MemoryBudget
from innova_smollm.core.types import (
    ChatMessage,
    ModelMetadata,
)
from innova_smollm.engine.kv_cache import resolve_kv_layout
from innova_smollm.errors import ModelLoadError
from innova_smollm.settings import KVLayout, Settings, display_name

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

#: llama.cpp's ``general.file_type`` values (enum llama_ftype) and the names people know them by.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip

#: Used when a GGUF carries no chat template: ChatML, which most small instruct models were tuned on.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def check_model_file(path: Path) -> None:
    """Fail with a message an operator can act on: the resolved path and what its directory holds."""
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist; {_directory_listing(path.parent)}")
    if not path.is_file():
        raise ModelLoadError(f"model path {path} is not a regular file; {_directory_listing(path.parent)}")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"model file {path} cannot be read: {exc.strerror}") from None
    size = path.stat().st_size
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'; {size} bytes)")


def _directory_listing(directory: Path) -> str:
    if not directory.is_dir():
        return f"its directory {directory} does not exist either"
    try:
        entries = sorted(entry.name for entry in directory.iterdir())
    except OSError as exc:
        return f"its directory {directory} cannot be listed: {exc.strerror}"
    if not entries:
        return f"its directory {directory} is empty"
    shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
    return f"its directory {directory} holds: {shown}"


class TokenPieces:
    """Each token's bytes and whether it ends generation, looked up once per token id.

    ``Llama.detokenize`` renders into a 32-byte buffer and returns nothing for longer pieces (SmolLM2 has dozens,
    runs of spaces among them), which silently drops text; this retries with the size llama.cpp asks for.
    """

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._cache: dict[int, tuple[bytes, bool]] = {}

    def __call__(self, token: int) -> tuple[bytes, bool]:
        cached = self._cache.get(token)
        if cached is None:
            cached = (self._bytes(token), bool(llama_cpp.llama_vocab_is_eog(self._vocab, token)))
            self._cache[token] = cached
        return cached

    def _bytes(self, token: int) -> bytes:
        # special=False renders control tokens as nothing.
        return token_piece(self._vocab, token, special=False)


def token_piece(vocab: Any, token: int, *, special: bool) -> bytes:
    """One token's bytes, retried with the size llama.cpp asks for when the piece is longer than the buffer."""
    size = 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        written = int(llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, special))
        if written >= 0:
            return buffer.raw[:written]
        size = -written  # a negative result is the size the piece needs


class GGUFModel:
    """A GGUF file opened for what every engine needs besides decoding: tokens, the chat template, a description.

    ``llama`` is the loaded model alone (:class:`LlamaModel`); the engine makes its decoding context from it.
    """

    def __init__(self, path: Path, settings: Settings) -> None:
        check_model_file(path)
        started = time.perf_counter()
        self.path = path
        self.llama, self.n_gpu_layers = open_model(path, settings)
        self.open_s = time.perf_counter() - started
        self.vocab = self.llama.vocab
        #: token -> (bytes it renders to, whether it ends generation); the vocabulary is fixed.
        self.pieces = TokenPieces(self.vocab)
        self._chat_formatter, self.template_source = self._make_chat_formatter()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_text(text, add_special=True, parse_special=False)

    def tokenize_text(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        tokens: list[int] = self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
        return tokens

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token, special tokens rendered as their text (``<|im_end|>``)."""
        return token_piece(self.vocab, token, special=True)

    @property
    def chat_template(self) -> str:
        return self._chat_formatter.template

    def tokenize_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        conversation: list[Any] = [m.template_form() for m in messages]
        # The template sees ``tools`` as the request gave them (OpenAI's shape), None when there are none.
        listed: Any = [dict(t) for t in tools] if tools else None
        rendered = self._chat_formatter(messages=conversation, tools=listed)
        # The template writes the special tokens (BOS included) itself, so none are added here.
        tokens: list[int] = self.llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)
        return tokens

    def describe(
        self,
        settings: Settings,
        *,
        n_ctx: int,
        parallel: int,
        flash_attn: bool,
        load_time_s: float,
        kv_layout: KVLayout,
        step_tokens: int,
    ) -> ModelMetadata:
        meta: dict[str, Any] = self.llama.metadata
        file_type = int(meta.get("general.file_type", -1))
        return ModelMetadata(
            name=display_name(self.path),
            path=str(self.path),
            architecture=str(meta.get("general.architecture", "unknown")),
            parameters=int(llama_cpp.llama_model_n_params(self.llama.model)),
            file_size_bytes=self.path.stat().st_size,
            quantization=FILE_TYPES.get(file_type, f"unknown (file_type {file_type})"),
            n_ctx=n_ctx,
            n_ctx_train=int(llama_cpp.llama_model_n_ctx_train(self.llama.model)),
            n_threads=settings.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            device="gpu" if self.n_gpu_layers != 0 else "cpu",
            has_chat_template=self.template_source == "gguf",
            chat_template_source=self.template_source,
            vocab_size=int(self.llama.n_vocab()),
            llama_cpp_python_version=str(llama_cpp.__version__),
            load_time_s=round(load_time_s, 3),
            parallel=parallel,
            flash_attn=flash_attn,
            kv_layout=kv_layout.value,
            step_tokens=step_tokens,
        )

    def kv_bytes_per_cell(self) -> int:
        return self.llama.kv_bytes_per_cell()

    def close(self) -> None:
        self.llama.close()

    def _make_chat_formatter(self) -> tuple[llama_chat_format.Jinja2ChatFormatter, str]:
        template = self.llama.metadata.get("tokenizer.chat_template")
        source = "gguf"
        if not template:
            template, source = FALLBACK_CHAT_TEMPLATE, "fallback:chatml"
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self._special_token_text(self.llama.token_eos()),
            bos_token=self._special_token_text(self.llama.token_bos()),
            add_generation_prompt=True,
        )
        return formatter, source

    def _special_token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self.llama.detokenize([token], special=True)).decode("utf-8", errors="replace")


def open_model(path: Path, settings: Settings) -> tuple[LlamaModel, int]:
    """Load the GGUF, offloading layers when asked and possible; on any offload failure fall back to the CPU."""
    n_gpu_layers = settings.n_gpu_layers
    if n_gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
        log.warning(
            "SMOLLM_N_GPU_LAYERS=%d but this llama.cpp build cannot offload to a GPU; running on the CPU",
            n_gpu_layers,
            extra={"event": "gpu_fallback"},
        )
        n_gpu_layers = 0
    try:
        return LlamaModel.load(path, n_gpu_layers=n_gpu_layers, use_mmap=settings.use_mmap), n_gpu_layers
    except ModelLoadError as exc:
        if n_gpu_layers == 0:
            raise
        log.warning("GPU offload failed (%s); loading on the CPU instead", exc, extra={"event": "gpu_fallback"})
    return LlamaModel.load(path, n_gpu_layers=0, use_mmap=settings.use_mmap), 0


class LlamaModel:
    """A llama.cpp model (``llama_model *``) loaded without any context, and what it answers without one.

    The methods are the few of ``llama_cpp.Llama`` the engine used (tokenize, detokenize, metadata, the special
    tokens), written over llama.cpp's public C API as llama-cpp-python exposes it.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        #: The GGUF's key/value metadata as llama.cpp renders it (every value a string).
        self.metadata: dict[str, str] = _read_metadata(model)

    @classmethod
    def load(cls, path: Path, *, n_gpu_layers: int, use_mmap: bool, shape_only: bool = False) -> LlamaModel:
        """``shape_only``: the metadata, the shape and the vocabulary, no weights allocated or read (llama.cpp's
        ``no_alloc``; ``vocab_only`` would skip the hyperparameters a memory budget needs)."""
        _init_llama_backend()
        params = llama_cpp.llama_model_default_params()
        params.no_alloc = shape_only
        params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers  # INT32_MAX: every layer
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {path} (n_gpu_layers={n_gpu_layers}; see its log above)")
        return cls(model)

    def tokenize(self, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
        size = len(text) + 2  # a token covers at least one byte, plus BOS and EOS
        while True:
            tokens = (llama_cpp.llama_token * size)()
            count = int(llama_cpp.llama_tokenize(self.vocab, text, len(text), tokens, size, add_bos, special))
            if count >= 0:
                return list(tokens[:count])
            size = -count  # a negative result is the number of tokens the text needs

    def detokenize(self, tokens: Sequence[int], *, special: bool) -> bytes:
        return b"".join(token_piece(self.vocab, token, special=special) for token in tokens)

    def kv_bytes_per_cell(self) -> int:
        """Bytes one KV cell takes in every layer: one token's keys and values at f16, llama.cpp's default."""
        model = self.model
        arch = self.metadata.get("general.architecture", "")
        n_head = max(int(llama_cpp.llama_model_n_head(model)), 1)
        head_dim = int(llama_cpp.llama_model_n_embd(model)) // n_head
        key_dim = int(self.metadata.get(f"{arch}.attention.key_length", head_dim))
        value_dim = int(self.metadata.get(f"{arch}.attention.value_length", head_dim))
        n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
        return int(llama_cpp.llama_model_n_layer(model)) * n_head_kv * (key_dim + value_dim) * 2

    def n_vocab(self) -> int:
        return int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    def token_bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    def token_eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    def close(self) -> None:
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def _read_metadata(model: Any) -> dict[str, str]:
    def read(call: Any, index: int) -> str:
        size = 256
        while True:
            buffer = ctypes.create_string_buffer(size)
            needed = int(call(model, index, buffer, size))
            if needed < size:  # the string's length, without its terminating NUL (negative: no such key)
                return buffer.value.decode("utf-8", errors="replace")
            size = needed + 1

    return {
        read(llama_cpp.llama_model_meta_key_by_index, index): read(llama_cpp.llama_model_meta_val_str_by_index, index)
        for index in range(int(llama_cpp.llama_model_meta_count(model)))
    }


_backend_lock = threading.Lock()
_backend_ready = False


def _init_llama_backend() -> None:
    """``llama_backend_init`` once per process, and llama.cpp's own log kept to its errors.

    llama-cpp-python prints every llama.cpp log line to stderr unless ``Llama(verbose=False)`` quietens it; without
    ``Llama`` the service sets a callback of its own, which passes llama.cpp's errors to this module's logger.
    """
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        llama_cpp.llama_log_set(_LLAMA_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


#: ggml_log_level's GGML_LOG_LEVEL_ERROR.
_GGML_LOG_LEVEL_ERROR = 3


def _forward_llama_cpp_errors(level: int, text: bytes, user_data: Any) -> None:
    if level == _GGML_LOG_LEVEL_ERROR:
        message = text.decode("utf-8", errors="replace").strip()
        if message:
            log.error("llama.cpp: %s", message, extra={"event": "llama_cpp_log"})


#: The C callback, held here for as long as llama.cpp may call it.
_LLAMA_LOG_CALLBACK = llama_cpp.llama_log_callback(_forward_llama_cpp_errors)


def memory_budget(path: Path, settings: Settings) -> MemoryBudget:
    """What the service may hold with ``path`` at ``settings`` (core/memory_budget.py): the file's size, the KV
    cache in the layout the engine would choose, and the margin. Reads the GGUF's shape only, not its weights."""
    check_model_file(path)
    model = LlamaModel.load(path, n_gpu_layers=0, use_mmap=False, shape_only=True)
    try:
        per_cell = model.kv_bytes_per_cell()
    finally:
        model.close()
    layout = resolve_kv_layout(settings.kv_layout, parallel=settings.parallel, window_bytes=settings.n_ctx * per_cell)
    return MemoryBudget(
        model_file_bytes=path.stat().st_size,
        kv_layout=layout,
        n_ctx=settings.n_ctx,
        parallel=settings.parallel,
        kv_bytes_per_cell=per_cell,
        saved_states_bytes=settings.prompt_cache_mb * 2**20 if settings.prompt_cache else 0,
    )
