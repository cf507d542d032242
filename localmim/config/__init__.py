"""Typed stage configs. ``SECTIONS`` maps each ``params.yaml`` top-level key to its pydantic model."""

from localmim.config.base import ParamsError, Section, apply_overrides, load_section, read_params_file, validate_section

SECTIONS: dict[str, type[Section]] = {}


def register_section(name: str):
    """Class decorator: make ``cls`` the model of top-level params key ``name``."""

    def deco(cls: type[Section]) -> type[Section]:
        SECTIONS[name] = cls
        return cls

    return deco


def all_sections() -> dict[str, type[Section]]:
    """Import every section module (so each registers itself) and return the mapping."""
    import importlib
    import pkgutil

    import localmim.config as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "base":
            importlib.import_module(f"localmim.config.{m.name}")
    return dict(SECTIONS)


def validate_all(tree: dict, source: str = "params") -> dict[str, Section]:
    """Validate every section of a params tree; unknown top-level keys are errors."""
    sections = all_sections()
    for key in tree:
        if key not in sections:
            raise ParamsError(f"{source}: {key}: unknown section (known: {', '.join(sorted(sections))})")
    return {name: validate_section(name, cls, tree.get(name), source) for name, cls in sections.items()}


__all__ = [
    "ParamsError",
    "SECTIONS",
    "Section",
    "all_sections",
    "apply_overrides",
    "load_section",
    "read_params_file",
    "register_section",
    "validate_all",
    "validate_section",
]
