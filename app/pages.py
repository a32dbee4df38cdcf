"""The dashboards, in navigation order (the entry point builds st.navigation from this list; the landing lists
each page's `answers` line, so the question a page answers is written once, here)."""
from __future__ import annotations

from typing import NamedTuple


class PageSpec(NamedTuple):
    path: str
    title: str
    icon: str
    url_path: str | None
    default: bool = False
    answers: str = ""          # one line: the question this dashboard answers (shown on the landing)


PAGES = [
    PageSpec("pages/overview.py", "Overview", ":material/calculate:", "overview", True,
             "How big is the model: parameters in total and per token, FLOPs, weight and KV-cache memory?"),
    PageSpec("pages/lessons.py", "Lessons", ":material/school:", "lessons", False,
             "Where do I start? Six guided sections that set the knobs for you and say what to look at."),
    PageSpec("pages/mla.py", "MLA & KV cache", ":material/memory:", "mla", False,
             "How much KV cache does Multi-head Latent Attention save, and how long a context fits on my GPUs?"),
    PageSpec("pages/moe.py", "MoE routing", ":material/hub:", "moe", False,
             "How does the router spread tokens over the experts, and how does the bias keep them balanced?"),
    PageSpec("pages/fp8.py", "FP8 lab", ":material/data_array:", "fp8", False,
             "What does rounding to 8-bit floats do to a tensor, and why fine-grained scales and FP32 promotion?"),
    PageSpec("pages/training.py", "Training lab", ":material/model_training:", "training", False,
             "Does a mini DeepSeek-V3 learn on this server, and what changes when one ingredient is swapped?"),
]
