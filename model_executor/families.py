"""Model families are found through the entry-point group `sparsed_engine.models`.

A family is its architecture (a DiffusionLM subclass) and its denoiser (a Denoiser); each entry
point names a ModelFamily. The built-in LLaDA and Dream are registered in pyproject.toml through
that same group, so a third-party package adds a family just by being installed.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

from model_executor.denoisers.base import Denoiser
from model_executor.models.base import DiffusionLM, ModelFamily

GROUP = "sparsed_engine.models"


@lru_cache(maxsize=None)
def _load(name: str, value: str) -> ModelFamily:
    (ep,) = [e for e in entry_points(group=GROUP) if e.name == name and e.value == value]
    family = ep.load()
    if not isinstance(family, ModelFamily):
        raise TypeError(f"entry point {name!r} ({value}) of {GROUP} is not a ModelFamily")
    if family.name != name or not issubclass(family.model_class, DiffusionLM) \
            or not isinstance(family.denoiser, Denoiser):
        raise TypeError(f"entry point {name!r} ({value}): the ModelFamily must be named {name!r}, "
                        f"with a DiffusionLM subclass and a Denoiser instance")
    return family


def installed_families() -> dict[str, ModelFamily]:
    families = {ep.name: _load(ep.name, ep.value) for ep in entry_points(group=GROUP)}
    if not families:  # even the built-in ones come from the package's metadata
        raise ValueError(f"no model families are registered under the entry-point group {GROUP!r}: "
                         f"install sparsed-engine (pip install -e .) rather than running it from a bare "
                         f"source tree on PYTHONPATH")
    return families


def get_family(name: str) -> ModelFamily:
    families = installed_families()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; installed: {', '.join(sorted(families))}")
    return families[name]


def resolve_family(config: dict) -> ModelFamily:
    """config.json -> its family, by `architectures` first, then `model_type`."""
    families = installed_families().values()
    for arch in config.get("architectures") or ():
        for family in families:
            if arch in family.architectures:
                return family
    model_type = str(config.get("model_type", "")).lower()
    for family in families:
        if model_type in (t.lower() for t in family.model_types):
            return family
    raise ValueError(
        f"unsupported architecture: architectures={config.get('architectures')!r}, "
        f"model_type={config.get('model_type')!r}; supported: architectures "
        f"{sorted(a for f in families for a in f.architectures)}, "
        f"model_type {sorted(t for f in families for t in f.model_types)}")
