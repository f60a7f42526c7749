"""Optional dependencies: a check that names the extra that brings them."""

from __future__ import annotations

import importlib.util

# What each extra brings that its users import, by top-level module name.
TORCH_MODULES = ("torch", "numpy", "safetensors", "sklearn")
SERVER_MODULES = (*TORCH_MODULES, "temporalio", "fastapi", "uvicorn", "sqlmodel", "pydantic_settings", "alembic")


class MissingExtraError(ImportError):
    """A module that an optional extra installs is missing."""

    def __init__(self, extra: str, module: str, what: str) -> None:
        super().__init__(
            f"{what} needs {module}, which comes with the '{extra}' extra: pip install 'fedloom[{extra}]'",
            name=module,
        )
        self.extra = extra


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:  # a finder that refuses it
        return True
    except ValueError:  # imported already, without a spec
        return False


def require_extra(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` if one of ``modules`` is not installed."""
    for module in modules:
        if _missing(module):
            raise MissingExtraError(extra, module, what)


def require_torch(what: str = "the fedloom client runtime") -> None:
    """Raise :class:`MissingExtraError` unless the ``torch`` extra is installed."""
    require_extra("torch", TORCH_MODULES, what)


def require_server(what: str = "this command") -> None:
    """Raise :class:`MissingExtraError` unless the ``server`` extra is installed."""
    require_extra("server", SERVER_MODULES, what)
