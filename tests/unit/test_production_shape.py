"""The production shape's pure logic (scripts/production_shape.py): no llama_cpp, no model, seconds."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import fetch_model  # scripts/ is not a package
import production_shape as ps

BLOCK_TENSORS = {
    "attn_norm.weight": (3072,),
    "attn_q.weight": (3072, 3072),
    "attn_k.weight": (1024, 3072),
    "attn_v.weight": (1024, 3072),
    "attn_output.weight": (3072, 3072),
    "ffn_norm.weight": (3072,),
    "ffn_gate.weight": (8192, 3072),
    "ffn_up.weight": (8192, 3072),
    "ffn_down.weight": (3072, 8192),
}
#: use_more_bits in llama-quant.cpp for 28 layers: the first 3, every third from 5, the last 4.
Q6_K_LAYERS = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]


def test_the_table_is_llama_3_2_3b_with_a_tied_output() -> None:
    table = ps.tensor_table()
    shapes = {spec.name: spec.shape for spec in table}
    assert len(table) == len(shapes) == 3 + 28 * len(BLOCK_TENSORS)
    assert shapes["token_embd.weight"] == (128256, 3072)
    assert shapes["output_norm.weight"] == (3072,)
    assert shapes["rope_freqs.weight"] == (64,)
    assert "output.weight" not in shapes  # tied: the embedding is the output matrix
    for layer in range(28):
        for suffix, shape in BLOCK_TENSORS.items():
            assert shapes.pop(f"blk.{layer}.{suffix}") == shape
    assert "blk.28.attn_q.weight" not in shapes
    kinds = {spec.name: spec.kind for spec in table}
    assert {kinds["token_embd.weight"], kinds["blk.7.ffn_up.weight"]} == {"weight"}
    assert kinds["blk.7.ffn_norm.weight"] == kinds["output_norm.weight"] == "norm"


def test_parameter_count_is_3_21_billion() -> None:
    table = ps.tensor_table()
    count = ps.parameter_count(table)
    assert count == 128256 * 3072 + 28 * (2 * 3072**2 + 2 * 1024 * 3072 + 3 * 8192 * 3072 + 2 * 3072) + 3072 + 64
    assert round(count / 1e9, 2) == 3.21
    # F16 for the matrices, F32 for norms and rope factors: the 6.4 GB intermediate file.
    assert sum(spec.nbytes for spec in table) == pytest.approx(6.43e9, rel=1e-3)


def test_kv_cache_bytes_per_cell() -> None:
    assert ps.LLAMA32_3B.kv_bytes_per_cell() == 28 * 8 * (128 + 128) * 2 == 114_688
    assert ps.LLAMA32_3B.kv_bytes_per_cell() * 4096 == 448 * 2**20  # n_ctx 4096: 448 MiB


def test_llama3_rope_factors() -> None:
    factors = ps.llama3_rope_factors()
    assert len(factors) == 64
    assert factors == sorted(factors)  # wavelength grows with the index, and so does the divisor
    assert factors[0] == 1.0 and factors[-1] == 32.0
    # High frequencies (wavelength < 8192 / 4) kept, low ones (> 8192) divided by 32, a smooth ramp between.
    ramp = [f for f in factors if 1.0 < f < 32.0]
    assert 0 < len(ramp) < 16
    assert factors.count(1.0) + factors.count(32.0) + len(ramp) == 64


def test_q4_k_m_types_and_the_predicted_size() -> None:
    table = ps.tensor_table()
    types = {spec.name: ps.q4_k_m_type(spec) for spec in table}
    assert types["token_embd.weight"] == ps.GGML_Q6_K
    assert [i for i in range(28) if types[f"blk.{i}.attn_v.weight"] == ps.GGML_Q6_K] == Q6_K_LAYERS
    assert [i for i in range(28) if types[f"blk.{i}.ffn_down.weight"] == ps.GGML_Q6_K] == Q6_K_LAYERS
    assert types["blk.3.attn_q.weight"] == types["blk.27.ffn_up.weight"] == ps.GGML_Q4_K
    assert types["blk.3.ffn_norm.weight"] == types["rope_freqs.weight"] == ps.GGML_F32
    data = ps.predicted_q4_k_m_tensor_bytes(table)
    assert data == 2_011_539_712
    # The rest of the real file is metadata, mostly the tokenizer (the vocab-only GGUF is 7,818,140 bytes).
    assert 7_800_000 < ps.REAL_FILE_SIZE - data < 7_900_000


def test_tensor_seeds_are_stable_and_distinct() -> None:
    names = [spec.name for spec in ps.tensor_table()]
    seeds = [ps.tensor_seed(name) for name in names]
    assert len(set(seeds)) == len(names)
    assert seeds == [ps.tensor_seed(name) for name in names]
    assert ps.tensor_seed("blk.0.attn_q.weight", base_seed=1) != ps.tensor_seed("blk.0.attn_q.weight", base_seed=2)
    # Pinned: a change here changes every built file, so RECIPE must be bumped with it.
    assert ps.tensor_seed("token_embd.weight", base_seed=20261206) == 16_372_198_504_362_021_131
    assert all(0 <= seed < 2**64 for seed in seeds)


def test_weights_do_not_depend_on_the_chunk_size() -> None:
    whole = np.concatenate(list(ps.seeded_normal_chunks("blk.3.ffn_up.weight", 10_000, chunk=10_000)))
    pieces = np.concatenate(list(ps.seeded_normal_chunks("blk.3.ffn_up.weight", 10_000, chunk=777)))
    assert whole.dtype == np.float16 and whole.shape == (10_000,)
    assert np.array_equal(whole, pieces)
    other = np.concatenate(list(ps.seeded_normal_chunks("blk.4.ffn_up.weight", 10_000)))
    assert not np.array_equal(whole, other)
    assert abs(float(whole.astype(np.float32).std()) - 0.02) < 0.001
    assert abs(float(whole.astype(np.float32).mean())) < 0.001


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (ps.TensorSpec("blk.0.attn_norm.weight", (3072,), "norm"), np.ones(3072, dtype=np.float32)),
        (ps.TensorSpec("rope_freqs.weight", (64,), "rope_freqs"), np.array(ps.llama3_rope_factors(), np.float32)),
        (
            ps.TensorSpec("blk.1.attn_k.weight", (4, 512), "weight"),
            np.concatenate(list(ps.seeded_normal_chunks("blk.1.attn_k.weight", 2048))),
        ),
    ],
    ids=["norm", "rope_freqs", "weight"],
)
def test_a_streamed_tensor_writes_exactly_its_bytes(spec: ps.TensorSpec, expected: np.ndarray) -> None:
    out = io.BytesIO()
    streamed = ps.StreamedTensor(spec)
    streamed.tofile(out)
    assert streamed.nbytes == len(out.getvalue()) == expected.nbytes
    assert out.getvalue() == expected.tobytes()


def test_sdist_members_are_read_without_unpacking_the_rest(tmp_path: Path) -> None:
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for member, text in [
            (ps.VOCAB_MEMBER, b"vocab"),
            (ps.TEMPLATE_MEMBER, b"{{ bos_token }}"),
            ("vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf", b"other"),
        ]:
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/{member}")
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text))
    into = tmp_path / "out"
    into.mkdir()
    found = ps.extract_members(sdist, [ps.VOCAB_MEMBER, ps.TEMPLATE_MEMBER], into)
    assert found[ps.VOCAB_MEMBER].read_bytes() == b"vocab"
    assert found[ps.TEMPLATE_MEMBER].read_text() == "{{ bos_token }}"
    assert sorted(path.name for path in into.iterdir()) == sorted(Path(m).name for m in found)
    with pytest.raises(SystemExit, match="holds no"):
        ps.extract_members(sdist, ["vendor/llama.cpp/models/missing.gguf"], into)


def _fake_cache(cache: Path, content: bytes = b"GGUF fake model", **overrides: object) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / ps.FILE_NAME
    model.write_bytes(content)
    record = {
        "recipe": ps.RECIPE,
        "size": len(content),
        "sha256": ps.sha256_of(model),
        "check_model": {"architecture": "llama"},
        **overrides,
    }
    ps.record_path(model).write_text(json.dumps(record))
    return model


def test_the_cache_is_used_only_when_its_record_matches(tmp_path: Path) -> None:
    assert ps.cached_model(tmp_path / "empty") is None
    model = _fake_cache(tmp_path / "ok")
    assert ps.cached_model(tmp_path / "ok") == model
    _fake_cache(tmp_path / "recipe", recipe=ps.RECIPE + 1)
    assert ps.cached_model(tmp_path / "recipe") is None
    _fake_cache(tmp_path / "size", size=1)
    assert ps.cached_model(tmp_path / "size") is None
    _fake_cache(tmp_path / "sha", sha256="0" * 64)
    assert ps.cached_model(tmp_path / "sha") is None
    assert ps.cached_model(tmp_path / "sha", verify_sha256=False) is not None
    (tmp_path / "ok" / ps.FILE_NAME).write_bytes(b"GGUF fake modeL")  # same size, other bytes
    assert ps.cached_model(tmp_path / "ok") is None


def test_fetch_model_links_the_cached_model_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake_cache(tmp_path / "cache")

    def no_build(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a cached model must not be built again")

    monkeypatch.setattr(ps, "build", no_build)
    dest = tmp_path / "models"
    argv = ["llama32-3b-shape", "--dest", str(dest), "--cache-dir", str(tmp_path / "cache")]
    assert fetch_model.main(argv) == 0
    link = dest / ps.FILE_NAME
    assert link.is_symlink() and link.resolve() == model.resolve()
    assert fetch_model.main(argv) == 0  # again: the link is kept
    assert link.resolve() == model.resolve()


def test_check_model_runs_once_per_built_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake_cache(tmp_path, check_model=None)  # as build() leaves it
    calls: list[Path] = []

    def check(path: Path) -> dict[str, object]:
        calls.append(path)
        return {"architecture": "llama", "vocab_size": 128256, "sample": "noise"}

    monkeypatch.setattr(ps, "run_check_model", check)
    assert ps.ensure_checked(model)["check_model"] == {"architecture": "llama", "vocab_size": 128256}
    assert ps.ensure_checked(model)["check_model"] == {"architecture": "llama", "vocab_size": 128256}
    assert calls == [model]
    assert ps.cached_model(tmp_path) == model  # the updated record still matches the file


def test_fetch_model_knows_the_built_model_and_says_its_answers_are_noise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        fetch_model.main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert "llama32-3b-shape" in help_text
    assert "ANSWERS ARE NOISE" in help_text
    assert "noise" in (ps.__doc__ or "")
