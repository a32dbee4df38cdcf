"""The landing (top of the default page): what DeepSeek-V3 is, what one can do here, a prominent entry into the
guided lessons, and one line per dashboard saying what it answers (from `app.pages.PAGES`, written once there).

The numbers in the introduction come from `core.published` (each constant cites its source) and the preset's
config, never typed here."""
from __future__ import annotations

import streamlit as st

from app.pages import PAGES
from core.config import PRESETS
from core.published import (V3_ACTIVATED_PARAMS, V3_CONTEXT_TOKENS, V3_PRETRAIN_TOKENS, V3_TOTAL_PARAMS,
                            billions)
from core.units import tokens

LESSONS_PAGE = "pages/lessons.py"


def intro_markdown() -> str:
    v3 = PRESETS["deepseek-v3"]
    return (
        f"**DeepSeek-V3** is an open-weight language model with {billions(V3_TOTAL_PARAMS)} parameters, of which "
        f"only {billions(V3_ACTIVATED_PARAMS)} work on each token. Three ideas make that affordable: "
        f"**Multi-head Latent Attention** caches one small latent per token ({v3.kv_lora_rank + v3.qk_rope_head_dim} "
        f"numbers per layer) so a {tokens(V3_CONTEXT_TOKENS)}-token context fits; a **mixture of experts** sends "
        f"each token to {v3.num_experts_per_tok} of {v3.n_routed_experts} experts and keeps them balanced without "
        f"an auxiliary loss; and **FP8 training** made its {V3_PRETRAIN_TOKENS / 1e12:.1f}T-token pre-training "
        "cheaper.\n\n"
        "Here every number is computed live from the model's config by a small PyTorch re-implementation: move a "
        "knob and watch the cache, the routing or the rounding change; train a mini DeepSeek-V3 on this server; "
        "copy the address bar to share exactly what you see.")


_GO = "_land_go"  # set by the button's callback; the next run switches page (st.switch_page is not for callbacks)


def render(lesson: bool = False) -> None:
    """The introduction box. Collapsed to one line once the session is in lesson mode (it has seen it)."""
    if st.session_state.pop(_GO, False):
        from app import lessons
        st.switch_page(LESSONS_PAGE, query_params=lessons.step_query(lessons.SECTIONS[0], 1))
    with st.expander("New here? Start with this", expanded=not lesson, icon=":material/waving_hand:"):
        st.markdown(intro_markdown())
        st.button("Start the guided lessons", type="primary", icon=":material/school:", key="land_lessons",
                  on_click=st.session_state.__setitem__, args=(_GO, True),
                  help="Step 1 of six short sections; each step sets a dashboard's knobs and says what to notice.")
        st.markdown("**Or open a dashboard** — each answers one question:")
        for p in PAGES:
            if p.path != LESSONS_PAGE:  # the link (a short label: page links do not wrap), its question under it
                st.page_link(p.path, label=p.title, icon=p.icon)
                st.caption(p.answers)
