"""The dashboards, in navigation order (the entry point builds st.navigation from this list)."""
from __future__ import annotations

from typing import NamedTuple


class PageSpec(NamedTuple):
    path: str
    title: str
    icon: str
    url_path: str | None
    default: bool = False


PAGES = [
    PageSpec("pages/overview.py", "Overview", ":material/calculate:", "overview", True),
    PageSpec("pages/mla.py", "MLA & KV cache", ":material/memory:", "mla"),
    PageSpec("pages/moe.py", "MoE routing", ":material/hub:", "moe"),
    PageSpec("pages/fp8.py", "FP8 lab", ":material/data_array:", "fp8"),
    PageSpec("pages/training.py", "Training lab", ":material/model_training:", "training"),
    PageSpec("pages/lessons.py", "Lessons", ":material/school:", "lessons"),
]
