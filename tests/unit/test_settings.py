"""Settings from the environment: defaults, parsing, and errors that name the variable (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from innova_smollm.errors import SettingsError
from innova_smollm.settings import (
    DEFAULT_MODEL_PATH,
    Fallback,
    FlashAttention,
    KVLayout,
    Provider,
    Settings,
    WarmKind,
    WarmPrompt,
)


def test_defaults_follow_the_contract(tmp_path: Path) -> None:
    settings = Settings.from_env({"BACKEND_ROOT": str(tmp_path)})
    assert settings.enabled is True
    assert settings.provider is Provider.LOCAL
    assert settings.model_path == tmp_path / DEFAULT_MODEL_PATH
    assert settings.backend == "llama.cpp"
    assert (settings.n_ctx, settings.max_tokens, settings.max_queue, settings.n_gpu_layers) == (4096, 1024, 8, 0)
    assert settings.n_threads >= 1
    assert settings.fallback is Fallback.NONE
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.log_content is False
    assert settings.adaptive_threads is True
    assert settings.kv_layout is KVLayout.AUTO
    assert settings.use_mmap is False
    assert (settings.head_timeout_s, settings.io_timeout_s, settings.keep_alive_s) == (10.0, 30.0, 5)
    # Four times what the engine admits (4 running + 8 waiting), at least 64.
    assert settings.max_requests == 64


def test_the_request_limit_follows_the_engines_admission_unless_set() -> None:
    assert Settings.from_env({"SMOLLM_PARALLEL": "8", "SMOLLM_MAX_QUEUE": "16"}).max_requests == 96
    assert Settings.from_env({"SMOLLM_PARALLEL": "8", "SMOLLM_MAX_REQUESTS": "10"}).max_requests == 10


def test_every_variable_is_read(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "ENABLE_SMOLLM": "false",
            "PROVIDER": "ECHO",
            "SMOLLM_MODEL_PATH": "/opt/innovaplus/models/current.gguf",
            "SMOLLM_N_CTX": "2048",
            "SMOLLM_N_THREADS": "3",
            "SMOLLM_N_GPU_LAYERS": "-1",
            "SMOLLM_MAX_TOKENS": "256",
            "SMOLLM_MAX_QUEUE": "0",
            "SMOLLM_PARALLEL": "4",
            "SMOLLM_REQUEST_TIMEOUT_S": "12.5",
            "SMOLLM_FALLBACK": "echo",
            "HOST": "::1",
            "PORT": "18080",
            "SMOLLM_API_KEYS": "0123456789abcdef, fedcba9876543210",
            "SMOLLM_LOG_CONTENT": "yes",
            "SMOLLM_FLASH_ATTN": "On",
            "SMOLLM_ADAPTIVE_THREADS": "false",
            "SMOLLM_KV_LAYOUT": "per_sequence",
            "SMOLLM_PROMPT_CACHE_MB": "0",
            "SMOLLM_USE_MMAP": "true",
            "SMOLLM_HEAD_TIMEOUT_S": "2.5",
            "SMOLLM_IO_TIMEOUT_S": "7",
            "SMOLLM_KEEP_ALIVE_S": "20",
            "SMOLLM_MAX_REQUESTS": "300",
        }
    )
    assert settings.enabled is False
    assert settings.provider is Provider.ECHO
    assert settings.model_path == Path("/opt/innovaplus/models/current.gguf")
    assert (settings.n_ctx, settings.n_threads, settings.n_gpu_layers) == (2048, 3, -1)
    assert (settings.max_tokens, settings.max_queue, settings.parallel) == (256, 0, 4)
    assert settings.request_timeout_s == 12.5
    assert settings.fallback is Fallback.ECHO
    assert (settings.host, settings.port) == ("::1", 18080)
    assert settings.api_keys == ("0123456789abcdef", "fedcba9876543210")
    assert settings.log_content is True
    assert settings.flash_attn is FlashAttention.ON
    assert settings.adaptive_threads is False
    assert settings.kv_layout is KVLayout.PER_SEQUENCE
    assert settings.prompt_cache_mb == 0
    assert settings.use_mmap is True
    assert (settings.head_timeout_s, settings.io_timeout_s, settings.keep_alive_s) == (2.5, 7.0, 20)
    assert settings.max_requests == 300


@pytest.mark.parametrize(
    ("value", "offloaded_layers", "several_sequences", "expected"),
    [
        ("auto", 0, False, False),
        ("auto", 0, True, True),
        ("auto", -1, False, True),
        ("auto", 12, False, True),
        ("on", 0, False, True),
        ("off", 0, True, False),
        ("off", -1, False, False),
    ],
)
def test_flash_attention_is_off_for_one_sequence_on_the_cpu_unless_asked(
    value: str, offloaded_layers: int, several_sequences: bool, expected: bool
) -> None:
    settings = Settings.from_env({"SMOLLM_FLASH_ATTN": value})
    assert settings.flash_attention_for(offloaded_layers, several_sequences=several_sequences) is expected


def test_relative_model_paths_resolve_from_the_backend_root(tmp_path: Path) -> None:
    settings = Settings.from_env({"BACKEND_ROOT": str(tmp_path), "SMOLLM_MODEL_PATH": "models/x.gguf"})
    assert settings.model_path == tmp_path / "models" / "x.gguf"
    assert settings.model_name == "x"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"ENABLE_SMOLLM": "maybe"}, ["ENABLE_SMOLLM", "maybe"]),
        ({"PROVIDER": "openai"}, ["PROVIDER", "local | echo"]),
        ({"SMOLLM_N_CTX": "big"}, ["SMOLLM_N_CTX", "not an integer"]),
        ({"SMOLLM_N_CTX": "8"}, ["SMOLLM_N_CTX", ">= 64"]),
        ({"SMOLLM_MAX_QUEUE": "-1"}, ["SMOLLM_MAX_QUEUE"]),
        ({"SMOLLM_PROMPT_CACHE_MB": "-5"}, ["SMOLLM_PROMPT_CACHE_MB"]),
        ({"SMOLLM_REQUEST_TIMEOUT_S": "inf"}, ["SMOLLM_REQUEST_TIMEOUT_S"]),
        ({"SMOLLM_REQUEST_TIMEOUT_S": "nan"}, ["SMOLLM_REQUEST_TIMEOUT_S"]),
        ({"SMOLLM_FALLBACK": "retry"}, ["SMOLLM_FALLBACK", "none | echo"]),
        ({"SMOLLM_FLASH_ATTN": "yes"}, ["SMOLLM_FLASH_ATTN", "auto | on | off"]),
        ({"SMOLLM_KV_LAYOUT": "unified"}, ["SMOLLM_KV_LAYOUT", "shared | per_sequence"]),
        ({"PORT": "70000"}, ["PORT", "65535"]),
        ({"SMOLLM_HEAD_TIMEOUT_S": "0"}, ["SMOLLM_HEAD_TIMEOUT_S", ">= 0.1"]),
        ({"SMOLLM_HEAD_TIMEOUT_S": "inf"}, ["SMOLLM_HEAD_TIMEOUT_S"]),
        ({"SMOLLM_IO_TIMEOUT_S": "soon"}, ["SMOLLM_IO_TIMEOUT_S", "not a number"]),
        ({"SMOLLM_KEEP_ALIVE_S": "0"}, ["SMOLLM_KEEP_ALIVE_S", ">= 1"]),
        ({"SMOLLM_KEEP_ALIVE_S": "1.5"}, ["SMOLLM_KEEP_ALIVE_S", "not an integer"]),
        ({"SMOLLM_MAX_REQUESTS": "0"}, ["SMOLLM_MAX_REQUESTS", ">= 1"]),
        ({"HOST": "a b"}, ["HOST"]),
        ({"SMOLLM_API_KEYS": "short"}, ["SMOLLM_API_KEYS", "16 characters"]),
        ({"SMOLLM_MODEL_PATH": "models/model.bin"}, ["SMOLLM_MODEL_PATH", ".bin", ".gguf (llama.cpp)"]),
        ({"SMOLLM_MODEL_PATH": "models/model"}, ["SMOLLM_MODEL_PATH", "(none)"]),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    for name in names:
        assert name in caught.value.message


def test_a_key_never_appears_in_its_error() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"SMOLLM_API_KEYS": "0123456789abcdef,tiny-secret"})
    assert "tiny-secret" not in caught.value.message


def test_listening_beyond_loopback_needs_keys_or_an_explicit_opt_in() -> None:
    with pytest.raises(SettingsError, match="SMOLLM_API_KEYS"):
        Settings.from_env({"HOST": "0.0.0.0"})
    assert Settings.from_env({"HOST": "0.0.0.0", "SMOLLM_API_KEYS": "0123456789abcdef"}).host == "0.0.0.0"
    assert Settings.from_env({"HOST": "0.0.0.0", "SMOLLM_ALLOW_INSECURE_LISTEN": "true"}).allow_insecure_listen
    assert Settings.from_env({"HOST": "localhost"}).host == "localhost"


def test_keys_are_not_shown_in_the_settings_repr() -> None:
    assert "0123456789abcdef" not in repr(Settings.from_env({"SMOLLM_API_KEYS": "0123456789abcdef"}))


def test_the_model_manifest_is_optional(tmp_path: Path) -> None:
    assert Settings.from_env({}).model_manifest is None
    manifest = tmp_path / "innova_model.fact"
    assert Settings.from_env({"SMOLLM_MODEL_MANIFEST": str(manifest)}).model_manifest == manifest


def test_display_name_drops_links_and_the_deployment_suffix(tmp_path: Path) -> None:
    from innova_smollm.settings import display_name

    target = tmp_path / "Llama-3.2-3B-Instruct-Q4_K_M-0123456789ab.gguf"
    target.write_bytes(b"GGUF")
    (tmp_path / "current.gguf").symlink_to(target.name)
    assert display_name(tmp_path / "current.gguf") == "Llama-3.2-3B-Instruct-Q4_K_M"
    assert display_name(tmp_path / "missing.gguf") == "missing"


def test_warm_prompts_are_read_from_the_json_file_named(tmp_path: Path) -> None:
    assert Settings.from_env({}).warm_prompts == ()
    path = tmp_path / "warm.json"
    path.write_text('[{"system": "You are KORYXA."}, {"text": "Summary:"}]', encoding="utf-8")
    settings = Settings.from_env({"SMOLLM_WARM_PROMPTS": str(path)})
    assert settings.warm_prompts == (
        WarmPrompt(WarmKind.SYSTEM, "You are KORYXA."),
        WarmPrompt(WarmKind.TEXT, "Summary:"),
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the file"),
        ("{not json", "the file is not JSON"),
        ('{"system": "x"}', "must hold a JSON list"),
        ('[{"sytem": "x"}]', "entry 0 has the key 'sytem'; use one of: system, text"),
        ('[{"system": "x"}, {"text": "  "}]', r"entry 1 \(text\) must be a non-empty string"),
        ('[{"system": "x", "text": "y"}]', "entry 0 must be an object with one key"),
    ],
)
def test_a_bad_warm_prompts_file_stops_start_up_naming_the_variable_and_the_entry(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "warm.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError, match=f"SMOLLM_WARM_PROMPTS='{path}'.*{message}"):
        Settings.from_env({"SMOLLM_WARM_PROMPTS": str(path)})


def test_warm_prompts_without_the_prompt_cache_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "warm.json"
    path.write_text('[{"system": "You are KORYXA."}]', encoding="utf-8")
    for off in ({"SMOLLM_PROMPT_CACHE": "false"}, {"SMOLLM_PROMPT_CACHE_MB": "0"}):
        with pytest.raises(SettingsError, match="SMOLLM_WARM_PROMPTS needs the prompt cache"):
            Settings.from_env({"SMOLLM_WARM_PROMPTS": str(path), **off})
