"""``--offload disk``: the weights stay in safetensors files on disk, and the process holds about one
decoder layer's worth of them at a time.

transformers and safetensors already map a safetensors checkpoint into memory rather than read it, when
the requested dtype is the file's: a weight's pages are read the first time a forward touches them, and
from then on count in the process's resident memory. Offloading adds two things, and no tensor store:

* after a decoder layer, the embedding or the head has run, the pages of its weights are handed back to
  the kernel (``madvise(MADV_DONTNEED)``); the next use reads them again, from the page cache while the
  machine has room for it, else from the disk;
* weights the tool rewrites (the channel reorder) are saved as one safetensors shard per layer in the run
  directory and mapped back from there, so they never all sit in memory either.

The mappings are read-only, so a write into an offloaded weight fails loudly instead of being lost when
its pages are released; the search only narrows weights by views, and the fused projections it copies
are ordinary memory that is never released.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UsageError
from .adapters import ArchitectureAdapter

OFFLOADS = ("none", "disk")
_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class OffloadError(UsageError):
    """The model cannot be offloaded as given."""


def offload_problem(spec: str, dtype: torch.dtype, gguf: bool = False) -> str | None:
    """Why ``spec`` cannot be loaded with ``--offload disk`` at ``dtype`` (None: it can), before loading;
    ``gguf``: the name stands for a GGUF file (an embedded model)."""
    directory = Path(spec)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        if gguf or spec.endswith(".gguf"):
            what = "a GGUF file"
        elif not directory.exists():
            what = "not a local directory"
        else:
            what = "not in safetensors"
        return (
            f"--offload disk maps the model's safetensors files, and {spec} is {what}. Save it once as a "
            "safetensors directory (AutoModelForCausalLM.from_pretrained(...).save_pretrained(DIR)) and "
            "give that directory, or drop --offload"
        )
    with safe_open(files[0], "pt") as f:
        stored = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 - no iteration
    floats = {_SAFETENSORS_DTYPES[s] for s in stored if s in _SAFETENSORS_DTYPES}
    if floats and dtype not in floats:
        names = ", ".join(str(d).removeprefix("torch.") for d in sorted(floats, key=str))
        return (
            f"--offload disk maps the weights as they are stored ({names} in {files[0].name}), and "
            f"--dtype asks for {str(dtype).removeprefix('torch.')}: give --dtype {names.split(',')[0]}"
        )
    return None


def _mapped_files() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of safetensors files."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def _storage_range(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _mapped(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether all of ``tensor``'s storage lies in one of the mapped ``ranges``."""
    start, end = _storage_range(tensor)
    return any(lo <= start and end <= hi for lo, hi in ranges)


def not_file_backed(model: nn.Module) -> list[str]:
    """The parameters whose memory is not a mapping of a safetensors file."""
    ranges = _mapped_files()
    return [name for name, p in model.named_parameters() if not _mapped(p, ranges)]


def mapped_resident_bytes() -> int:
    """Bytes of safetensors mappings resident in this process (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = len(head) == 6 and head[5].strip().endswith(".safetensors")
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


class PageRelease:
    """Hands a module's mapped weight pages back to the kernel each time it has run."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.ranges = _mapped_files()
        modules = [*adapter.layers(model), model.get_input_embeddings(), model.get_output_embeddings()]
        self._hooks = [m.register_forward_hook(self._after) for m in modules if m is not None]

    def refresh(self) -> None:
        """Re-read the mappings (after weights were mapped from new files)."""
        self.ranges = _mapped_files()

    def _after(self, module: nn.Module, args, output) -> None:
        self.release(module.parameters())

    def release(self, params: Iterator[torch.Tensor]) -> None:
        for p in params:
            if not _mapped(p, self.ranges):
                continue  # ordinary memory (a copied fused projection): not ours to drop
            start, end = _storage_range(p)
            first = start - start % _PAGE
            if self._libc.madvise(first, end - first, _MADV_DONTNEED) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"madvise failed on an offloaded weight: {os.strerror(err)}")

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def map_layers_from_disk(model: nn.Module, adapter: ArchitectureAdapter, directory: Path) -> None:
    """Save every decoder layer's weights (as they are now: reordered) to a shard in ``directory`` and
    map them back from there, one layer at a time, so at most one layer's copy is in ordinary memory."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, layer in enumerate(adapter.layers(model)):
        params = dict(layer.named_parameters())
        path = directory / f"layer-{index:05d}.safetensors"
        partial = path.with_suffix(".partial")
        save_file({name: p.detach().contiguous() for name, p in params.items()}, str(partial))
        os.replace(partial, path)
        mapped = load_file(str(path))
        for name, p in params.items():
            p.data = mapped[name]
