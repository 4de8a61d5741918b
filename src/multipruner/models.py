"""Loading models: which model in which precision on which device (``ModelSettings``), and ``load_model``
for embedded short names, GGUF files, HF directories, hub ids and pruned checkpoints."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from .core.offload import OFFLOADS, OffloadError, not_file_backed, offload_problem
from .model_sources import EMBEDDED, ModelLoadError, check_model, is_pruned_dir
from .settings import setting

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


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
    offload: str = setting(
        "none",
        help="disk: keep the weights in the model's safetensors files and hold about one layer of them in "
        "memory at a time (the same scores, more reading); none: hold the whole model",
        choices=OFFLOADS,
        affects_result=False,
    )

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device())

    def check(self, *, tokenizer: bool = True, dense: bool = False) -> None:
        """What can be checked before loading: the device, and the model (see :func:`check_model`)."""
        self.torch_device()
        check_model(self.model, tokenizer=tokenizer, dense=dense)
        if self.offload == "disk" and (
            problem := offload_problem(self.model, self.torch_dtype(), gguf=self.model in EMBEDDED)
        ):
            raise OffloadError(problem)

    def load(self):
        model, tokenizer = load_model(self.model, dtype=self.torch_dtype(), device=self.torch_device())
        if self.offload == "disk" and (copied := not_file_backed(model)):
            raise OffloadError(
                f"--offload disk: {len(copied)} weights of {self.model} were copied into memory on loading "
                f"(e.g. {copied[0]}), so there is nothing to offload; give a directory whose safetensors "
                "hold the weights as the model uses them, or drop --offload"
            )
        return model, tokenizer


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


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a short name, a ``.gguf`` file, an HF directory or hub id.

    Directories written by multipruner load through our own classes (no remote code needed).
    """
    torch_dtype = _dtype(dtype)
    check_model(spec, tokenizer=False)
    kwargs: dict = {}
    if spec in EMBEDDED:
        gguf = EMBEDDED[spec].gguf_path()
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif spec.endswith(".gguf"):
        source, kwargs = str(Path(spec).parent), {"gguf_file": Path(spec).name}
    elif Path(spec).is_dir() and is_pruned_dir(Path(spec)):
        from .core.checkpoint import load_pruned

        return load_pruned(spec, dtype=torch_dtype, device=device)
    else:
        source = spec  # a Hugging Face directory, or a hub id (only works online)
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
