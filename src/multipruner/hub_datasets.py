"""Loading a dataset split from the Hugging Face hub (or its cache), failing at once and with a
:class:`DataSourceError` when the machine is offline or the hub is unreachable."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .text_files import DataSourceError

if TYPE_CHECKING:
    import datasets

_TRUTHY = frozenset({"1", "on", "yes", "true"})


def offline_variable() -> str | None:
    """Name of the environment variable that declares the machine offline, if any."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return var
    return None


def _libraries_offline() -> bool:
    """Whether ``datasets``/``huggingface_hub`` themselves run offline (they read the variable at import)."""
    import datasets.config
    import huggingface_hub.constants

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) and bool(
        huggingface_hub.constants.HF_HUB_OFFLINE
    )


def _hub_error(name: str, detail: str, hint: str) -> DataSourceError:
    return DataSourceError(f"could not load hub dataset {name!r}: {detail}. {hint}")


def load_hub_dataset(
    path: str, *, split: str, hint: str, name: str | None = None, data_files: dict | None = None
) -> datasets.Dataset:
    """Load one split through :func:`datasets.load_dataset`, turning every failure into DataSourceError.

    When the offline variable was set after ``datasets`` was imported, the libraries would still try the
    network (with retries for tens of seconds), so we fail immediately instead.
    """
    offline_var = offline_variable()
    label = path if name is None else f"{path}/{name}"
    if offline_var and not _libraries_offline():
        raise _hub_error(label, f"the machine is offline ({offline_var}=1) and it is not cached", hint)
    import datasets

    try:
        return datasets.load_dataset(path, name=name, data_files=data_files, split=split)
    except Exception as exc:  # any hub, network or cache failure is a data-source problem for the user
        offline = offline_var or ("HF_HUB_OFFLINE" if _libraries_offline() else None)
        detail = (
            f"the machine is offline ({offline}=1) and it is not cached"
            if offline
            else "the Hugging Face Hub is unreachable or the dataset is unavailable"
        )
        raise _hub_error(label, f"{detail} ({type(exc).__name__}: {exc})", hint) from exc


def hub_column(dataset: datasets.Dataset, column: str, label: str) -> list[str]:
    if column not in dataset.column_names:
        raise DataSourceError(f"hub dataset {label!r} has no column {column!r} ({dataset.column_names})")
    return list(dataset[column])
