"""Functions the local lmms-eval tasks name in their YAML (`!function experiments.lmms_tasks.utils.X`).
Kept free of lmms-eval imports: lmms-eval calls them, they only read the task's files."""

from __future__ import annotations

from PIL import Image


def doc_to_visual(doc: dict) -> list:
    """A document -> its visuals as the `casa` model reads them: [PIL image] or [frames folder]."""
    if doc.get("video"):
        return [doc["video"]]
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]
