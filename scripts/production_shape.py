"""Llama-3.2-3B-Instruct's exact shape with seeded random weights, built as a Q4_K_M GGUF (``llama32-3b-shape``).

The production model cannot be downloaded on our machines, but its cost can be measured: speed, memory and the
KV cache depend on the shape, not on the values of the weights. This module describes that shape (28 blocks,
n_embd 3072, 24 query heads and 8 KV heads of 128, n_ff 8192, Llama 3's 128,256-token vocabulary, tied output)
and builds the file:

1. ``pip download`` the llama-cpp-python sdist of the installed version and read two members from it: the
   vocab-only GGUF ``ggml-vocab-llama-bpe.gguf`` (Llama 3's tokenizer) and Llama 3.2's chat template;
2. write an F16 GGUF of the exact shape with the ``gguf`` package, tensor by tensor, each tensor drawn from
   N(0, 0.02) by a generator seeded from its name (norms 1.0; Llama 3's rope frequency factors);
3. quantize it to Q4_K_M with llama-cpp-python's own ``llama_model_quantize`` and delete the F16 file;
4. check the tensor types and the size against the prediction here, and load it with ``innova-smollm check-model``.

Its answers are noise (random weights): use it for speed, memory, KV sizing, prompt rendering and tokenization,
never for answer quality. Only the standard library is imported at module level, so ``fetch_model.py`` stays
usable before a venv exists; building needs numpy, gguf and llama_cpp (the ``dev`` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import numpy as np

MODEL_NAME = "llama32-3b-shape"
FILE_NAME = "Llama-3.2-3B-Instruct-shape.Q4_K_M.gguf"
#: Bumped whenever a change here changes the file that gets built; a cached file of another recipe is rebuilt.
RECIPE = 1
BASE_SEED = 20261206
WEIGHT_STD = 0.02

SDIST_PACKAGE = "llama-cpp-python"
VOCAB_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf"
TEMPLATE_MEMBER = "vendor/llama.cpp/models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja"

#: Size of the real Llama-3.2-3B-Instruct Q4_K_M file; ours differs only in a few metadata strings.
REAL_FILE_SIZE = 2_019_377_600
SIZE_TOLERANCE = 64 * 1024  # one tensor of another quant type would move the size by megabytes

BOS_TOKEN_ID = 128000  # <|begin_of_text|>
EOS_TOKEN_ID = 128009  # <|eot_id|>: Llama 3.2 Instruct ends a turn with it (the vocab file says 128001)
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15
_OVERRIDDEN_KEYS = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"}

# ggml type ids and block sizes of the types a Q4_K_M file of this shape holds.
GGML_F32, GGML_F16, GGML_Q4_K, GGML_Q6_K = 0, 1, 12, 14
TYPE_NAMES = {GGML_F32: "F32", GGML_F16: "F16", GGML_Q4_K: "Q4_K", GGML_Q6_K: "Q6_K"}
_BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_K: (256, 144), GGML_Q6_K: (256, 210)}
ALIGNMENT = 32


@dataclass(frozen=True)
class Shape:
    """Llama-3.2-3B-Instruct's hyperparameters (its config.json, as convert_hf_to_gguf.py writes them)."""

    n_layer: int = 28
    n_embd: int = 3072
    n_head: int = 24
    n_head_kv: int = 8
    head_dim: int = 128
    n_ff: int = 8192
    n_vocab: int = 128256
    n_ctx_train: int = 131072
    rope_base: float = 500000.0
    rms_eps: float = 1e-5
    # rope_scaling {"rope_type": "llama3", "factor": 32, "low_freq_factor": 1, "high_freq_factor": 4,
    # "original_max_position_embeddings": 8192}: GGUF carries it as the rope_freqs.weight tensor.
    rope_factor: float = 32.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_ctx: int = 8192

    def kv_bytes_per_cell(self, bytes_per_value: int = 2) -> int:
        """One token's keys and values in every layer (f16 cache): 28 x 8 x (128 + 128) x 2 = 114,688."""
        return self.n_layer * self.n_head_kv * (self.head_dim + self.head_dim) * bytes_per_value


LLAMA32_3B = Shape()


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: ``shape`` is numpy's order (rows, columns), the reverse of ggml's ``ne``, as gguf takes it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "weight" (random F16), "norm" (ones, F32) or "rope_freqs" (F32)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def ggml_type(self) -> int:
        return GGML_F16 if self.kind == "weight" else GGML_F32

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.n_elements, self.ggml_type)


def tensor_bytes(n_elements: int, ggml_type: int) -> int:
    block, size = _BLOCK[ggml_type]
    if n_elements % block:
        raise ValueError(f"{n_elements} elements do not fill {TYPE_NAMES[ggml_type]} blocks of {block}")
    return n_elements // block * size


def tensor_table(shape: Shape = LLAMA32_3B) -> list[TensorSpec]:
    """The tensors in file order, as convert_hf_to_gguf.py writes Llama 3.2: tied output, so no ``output.weight``."""
    q_dim, kv_dim = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    table = [
        TensorSpec("rope_freqs.weight", (shape.head_dim // 2,), "rope_freqs"),
        TensorSpec("token_embd.weight", (shape.n_vocab, shape.n_embd), "weight"),
    ]
    for i in range(shape.n_layer):
        table += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (shape.n_embd,), "norm"),
            TensorSpec(f"blk.{i}.attn_q.weight", (q_dim, shape.n_embd), "weight"),
            TensorSpec(f"blk.{i}.attn_k.weight", (kv_dim, shape.n_embd), "weight"),
            TensorSpec(f"blk.{i}.attn_v.weight", (kv_dim, shape.n_embd), "weight"),
            TensorSpec(f"blk.{i}.attn_output.weight", (shape.n_embd, q_dim), "weight"),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (shape.n_embd,), "norm"),
            TensorSpec(f"blk.{i}.ffn_gate.weight", (shape.n_ff, shape.n_embd), "weight"),
            TensorSpec(f"blk.{i}.ffn_up.weight", (shape.n_ff, shape.n_embd), "weight"),
            TensorSpec(f"blk.{i}.ffn_down.weight", (shape.n_embd, shape.n_ff), "weight"),
        ]
    table.append(TensorSpec("output_norm.weight", (shape.n_embd,), "norm"))
    return table


def parameter_count(table: Sequence[TensorSpec]) -> int:
    """What llama.cpp's ``llama_model_n_params`` reports: every element of every tensor."""
    return sum(spec.n_elements for spec in table)


def llama3_rope_factors(shape: Shape = LLAMA32_3B) -> list[float]:
    """The per-frequency divisors of Llama 3's rope scaling, as convert_hf_to_gguf.py computes ``rope_freqs``."""
    low_freq_wavelen = shape.rope_original_ctx / shape.rope_low_freq_factor
    high_freq_wavelen = shape.rope_original_ctx / shape.rope_high_freq_factor
    factors = []
    for i in range(0, shape.head_dim, 2):
        freq = 1.0 / (shape.rope_base ** (i / shape.head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(shape.rope_factor)
        else:
            smooth = (shape.rope_original_ctx / wavelen - shape.rope_low_freq_factor) / (
                shape.rope_high_freq_factor - shape.rope_low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / shape.rope_factor + smooth))
    return factors


def _use_more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp: the first and last eighth of the layers, and every third one between, get Q6_K.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_type(spec: TensorSpec, shape: Shape = LLAMA32_3B) -> int:
    """The ggml type llama.cpp's Q4_K_M recipe gives this tensor (llama-quant.cpp, for this architecture)."""
    if spec.kind != "weight":
        return GGML_F32
    if spec.name == "token_embd.weight":
        return GGML_Q6_K  # tied: the embedding is also the output matrix, which gets Q6_K
    if spec.name.endswith((".attn_v.weight", ".ffn_down.weight")):
        layer = int(spec.name.split(".")[1])
        return GGML_Q6_K if _use_more_bits(layer, shape.n_layer) else GGML_Q4_K
    return GGML_Q4_K


def predicted_q4_k_m_tensor_bytes(table: Sequence[TensorSpec], shape: Shape = LLAMA32_3B) -> int:
    """Bytes of tensor data in the Q4_K_M file, alignment padding included (the metadata comes on top)."""
    padded = 0
    for spec in table:
        size = tensor_bytes(spec.n_elements, q4_k_m_type(spec, shape))
        padded += -(-size // ALIGNMENT) * ALIGNMENT
    return padded


def tensor_seed(name: str, base_seed: int = BASE_SEED) -> int:
    """A 64-bit seed from the tensor's name: stable across runs, machines and Python versions (unlike hash())."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def seeded_normal_chunks(
    name: str, n_elements: int, *, std: float = WEIGHT_STD, chunk: int = 1 << 22, base_seed: int = BASE_SEED
) -> Iterator[np.ndarray[Any, np.dtype[np.float16]]]:
    """The tensor's values as F16 in chunks of ``chunk`` elements; the values do not depend on the chunk size."""
    import numpy as np

    rng = np.random.default_rng(tensor_seed(name, base_seed))
    remaining = n_elements
    while remaining > 0:
        count = min(chunk, remaining)
        block = rng.standard_normal(count, dtype=np.float32)
        block *= np.float32(std)
        yield block.astype(np.float16)
        remaining -= count


class StreamedTensor:
    """What ``GGUFWriter.write_tensor_data`` reads of an array (``nbytes``, ``tofile``), generated chunk by chunk.

    A 128,256 x 3,072 embedding is 788 MB in F16; streaming keeps the writer's memory to a few tens of MB.
    """

    def __init__(self, spec: TensorSpec, base_seed: int = BASE_SEED, shape: Shape = LLAMA32_3B) -> None:
        self.spec = spec
        self.base_seed = base_seed
        self.shape = shape
        self.nbytes = spec.nbytes

    def tofile(self, fout: IO[bytes]) -> None:
        import numpy as np

        if self.spec.kind == "weight":
            for block in seeded_normal_chunks(self.spec.name, self.spec.n_elements, base_seed=self.base_seed):
                fout.write(block.tobytes())
        elif self.spec.kind == "norm":
            fout.write(np.ones(self.spec.n_elements, dtype=np.float32).tobytes())
        else:
            fout.write(np.asarray(llama3_rope_factors(self.shape), dtype=np.float32).tobytes())


# --- the cache ------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "innova-smollm" / "models"


def record_path(model: Path) -> Path:
    return model.with_name(model.name + ".json")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_record(model: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(record_path(model).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def cached_model(cache_dir: Path | None = None, *, verify_sha256: bool = True) -> Path | None:
    """The cached file when its record says it was built by this recipe and its size (and sha256) still match."""
    model = (cache_dir or default_cache_dir()) / FILE_NAME
    record = read_record(model)
    if record is None or record.get("recipe") != RECIPE or not model.is_file():
        return None
    if model.stat().st_size != record.get("size"):
        return None
    if verify_sha256 and sha256_of(model) != record.get("sha256"):
        return None
    return model


# --- building -------------------------------------------------------------------------------------------------


def installed_llama_cpp_version() -> str:
    from importlib.metadata import version

    return version(SDIST_PACKAGE)


def download_sdist(version: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", SDIST_PACKAGE]
    subprocess.run([*argv, "-d", str(into), f"{SDIST_PACKAGE}=={version}"], check=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz")) + sorted(into.glob("llama-cpp-python-*.tar.gz"))
    if not found:
        listing = sorted(path.name for path in into.iterdir())
        raise SystemExit(f"pip download left no llama-cpp-python sdist in {into}: {listing}")
    return found[0]


def extract_members(sdist: Path, wanted: Sequence[str], into: Path) -> dict[str, Path]:
    """Copy the members whose path below the sdist's top directory is in ``wanted``; the rest is never unpacked."""
    found: dict[str, Path] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            relative = member.name.split("/", 1)[1] if "/" in member.name else member.name
            if relative not in wanted or not member.isfile():
                continue
            source = archive.extractfile(member)
            if source is None:
                continue
            target = into / Path(relative).name
            with source, target.open("wb") as dst:
                shutil.copyfileobj(source, dst, 1 << 20)
            found[relative] = target
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SystemExit(f"{sdist.name} holds no {missing}")
    return found


def write_f16(path: Path, vocab: Path, template: str, shape: Shape = LLAMA32_3B, base_seed: int = BASE_SEED) -> None:
    """Write the F16 GGUF tensor by tensor: only one chunk of one tensor is in memory at a time."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_type("model")
    writer.add_name("Llama 3.2 3B Instruct shape (random weights: its answers are noise)")
    writer.add_description(f"innova-smollm {MODEL_NAME} recipe {RECIPE}, seed {base_seed}, N(0, {WEIGHT_STD})")
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_rope_dimension_count(shape.head_dim)
    reader = gguf.GGUFReader(vocab)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key in _OVERRIDDEN_KEYS:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    writer.add_bos_token_id(BOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_chat_template(template)
    table = tensor_table(shape)
    for spec in table:
        dtype = np.dtype(np.float16 if spec.kind == "weight" else np.float32)
        writer.add_tensor_info(spec.name, spec.shape, dtype, spec.nbytes)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec in table:
        # The writer only reads nbytes and calls tofile(): a streamed tensor stands in for an array.
        writer.write_tensor_data(cast("np.ndarray[Any, Any]", StreamedTensor(spec, base_seed, shape)))
    writer.close()


def quantize_q4_k_m(source: Path, target: Path, nthread: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = nthread
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize({source} -> {target}) failed with status {status}")


def check_quantized(path: Path, shape: Shape = LLAMA32_3B) -> list[str]:
    """Problems with the file: a tensor missing, of another shape or quant type, or the size off the real file's."""
    import gguf

    problems = []
    reader = gguf.GGUFReader(path)
    actual = {t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type)) for t in reader.tensors}
    table = tensor_table(shape)
    for spec in table:
        expected = (spec.shape, q4_k_m_type(spec, shape))
        if actual.get(spec.name) != expected:
            problems.append(f"{spec.name}: {actual.get(spec.name)} instead of {expected}")
    extra = sorted(set(actual) - {spec.name for spec in table})
    if extra:
        problems.append(f"unexpected tensors {extra}")
    size = path.stat().st_size
    if abs(size - REAL_FILE_SIZE) > SIZE_TOLERANCE:
        problems.append(f"{size:,} bytes, more than {SIZE_TOLERANCE:,} from the real file's {REAL_FILE_SIZE:,}")
    return problems


def run_check_model(path: Path) -> dict[str, Any]:
    """``innova-smollm check-model --json`` on the file, from the venv this runs in."""
    command = shutil.which("innova-smollm", path=str(Path(sys.executable).parent))
    argv = [command] if command else [sys.executable, "-m", "innova_smollm"]
    result = subprocess.run([*argv, "check-model", "--json", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"check-model failed on {path}:\n{result.stderr.strip()}")
    meta: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return meta


@contextlib.contextmanager
def _step(label: str) -> Iterator[None]:
    started = time.perf_counter()
    print(f"{MODEL_NAME}: {label} ...", flush=True)
    yield
    print(f"{MODEL_NAME}: {label}: {time.perf_counter() - started:.1f} s", flush=True)


def build(cache_dir: Path, *, nthread: int | None = None) -> Path:
    """Build the Q4_K_M file into ``cache_dir`` (minutes) and record its sha256, size and how it was made.

    The record says ``check_model: null``: ``ensure`` runs check-model next (seconds), so a check that fails for a
    reason of the environment (a llama.cpp build that crashes, say) costs a re-check, not a rebuild.
    """
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / FILE_NAME
    version = installed_llama_cpp_version()
    # The scratch directory is beside the cache: the 6.4 GB F16 file must not land in a small tmpfs.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        scratch = Path(tmp)
        with _step(f"downloading the {SDIST_PACKAGE}=={version} sdist"):
            sdist = download_sdist(version, scratch / "sdist")
        members = extract_members(sdist, [VOCAB_MEMBER, TEMPLATE_MEMBER], scratch)
        sdist.unlink()
        template = members[TEMPLATE_MEMBER].read_text(encoding="utf-8")
        f16 = scratch / "shape.F16.gguf"
        with _step("writing the F16 GGUF (about 6.4 GB)"):
            write_f16(f16, members[VOCAB_MEMBER], template)
        partial = scratch / (FILE_NAME + ".partial")
        with _step("quantizing to Q4_K_M with llama_cpp.llama_model_quantize"):
            quantize_q4_k_m(f16, partial, nthread or os.cpu_count() or 1)
        f16.unlink()
        problems = check_quantized(partial)
        if problems:
            raise SystemExit(f"{MODEL_NAME}: the quantized file is not the production shape:\n" + "\n".join(problems))
        record = {
            "model": MODEL_NAME,
            "recipe": RECIPE,
            "file": FILE_NAME,
            "size": partial.stat().st_size,
            "sha256": sha256_of(partial),
            "llama_cpp_python": version,
            "seed": BASE_SEED,
            "built_s": round(time.perf_counter() - started, 1),
            "check_model": None,
            "note": "random weights: its answers are noise; for speed, memory, KV sizing and tokenization only",
        }
        # Same filesystem, so the rename is atomic; the record is written last, so a half-built file is never used.
        partial.replace(final)
        record_path(final).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{MODEL_NAME}: built {final} ({record['size']:,} bytes, sha256 {record['sha256']}) in {record['built_s']} s")
    return final


def ensure_checked(model: Path) -> dict[str, Any]:
    """Run ``innova-smollm check-model`` once per built file and keep its verdict in the record."""
    record = read_record(model) or {}
    if not record.get("check_model"):
        meta = run_check_model(model)
        keys = ("architecture", "parameters", "vocab_size", "quantization", "has_chat_template", "check_s")
        record["check_model"] = {key: meta[key] for key in keys if key in meta}
        record_path(model).write_text(json.dumps(record, indent=2) + "\n")
        print(f"{model}: check-model OK {record['check_model']}")
    return record


def ensure(dest: Path, cache_dir: Path | None = None, *, rebuild: bool = False) -> Path:
    """The cached model (built when missing or stale, then checked), linked into ``dest`` as ``dest/FILE_NAME``."""
    cache_dir = cache_dir or default_cache_dir()
    model = None if rebuild else cached_model(cache_dir)
    if model is None:
        model = build(cache_dir)
    else:
        record = read_record(model) or {}
        print(f"{model}: cached and verified (sha256 {record.get('sha256')}, {record.get('size'):,} bytes)")
    ensure_checked(model)
    dest.mkdir(parents=True, exist_ok=True)
    link = dest / FILE_NAME
    if link.resolve() != model.resolve():
        # A symlink, not a copy: 2 GB once, in the cache outside the clone. Replaced atomically.
        staging = dest / (FILE_NAME + ".link")
        staging.unlink(missing_ok=True)
        staging.symlink_to(model)
        staging.replace(link)
    print(f"{link} -> {model} (random weights: its answers are noise)")
    return link
