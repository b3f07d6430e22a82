"""Class paths of a model spec -> classes (`modeling_casa.instantiate`).

In the library a class is imported by its path. An export replaces this file with one that
imports exactly the classes of its own spec (`casa.hf.source.parts_module`), so that
transformers copies their modules, and only theirs, into the remote-code folder."""

from __future__ import annotations

import importlib


def resolve(class_path: str):
    """"casa.fusion.CASA" -> the class."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"class_path={class_path!r} cannot be imported ({e})") from None
