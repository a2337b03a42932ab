"""Where the shipped configs (``configs/``) are, whatever the install.

A checkout (and ``pip install -e .``) reads the top-level folder of the source tree; a
regular install (``pip install .``, a wheel) carries a copy inside the package
(``eglp_dist/configs``; ``pyproject.toml`` maps the folder there), so
``eglp train configs/demo/tiny_uda.yaml`` works from any folder.
"""
from __future__ import annotations

from pathlib import Path

from eglp_dist.errors import UserError

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """``configs``: the installed copy, else the source tree's folder."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise UserError(f"the shipped {name}/ folder is missing: neither {_PACKAGE / name} (installed) nor "
                    f"{_PACKAGE.parent / name} (source tree) exists; reinstall eglp_dist")


def shipped_config(path: Path) -> Path:
    """A config path as given, or, when no such file exists, the shipped config of that
    name (``configs/demo/x.yaml`` or ``demo/x.yaml`` -> ``<configs>/demo/x.yaml``)."""
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    candidate = resource_dir("configs").joinpath(*parts) if parts else path
    return candidate if candidate.is_file() else path
