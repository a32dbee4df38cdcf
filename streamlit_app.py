"""Eva — the DeepSeek-V3 Explorer: entry point (`streamlit run streamlit_app.py`).

Page config, navigation over the dashboards in pages/, and the shared sidebar (model, seed, lesson mode) whose
knobs are bound to the URL here, in the entry point, so they survive page changes and travel in a copied link.
"""
import streamlit as st

st.set_page_config(page_title="Eva — DeepSeek-V3 Explorer", page_icon=":material/neurology:", layout="wide",
                   initial_sidebar_state="auto",
                   menu_items={"About": "Eva — the DeepSeek-V3 Explorer. Every number is computed live by `core/`, "
                                        "a pure-PyTorch re-implementation of DeepSeek-V3."})

from app import shell, sidebar, state  # noqa: E402  (after set_page_config)
from app import lessons  # noqa: E402
from app.lab import views as lab_views  # noqa: E402

pg = shell.navigation()
state.note_slot()
sidebar.render()
lab_views.sidebar_status(pg)  # a running training run: progress + heartbeat on the other pages
lessons.sidebar_back(pg)      # opened from a lesson step: a link back to it
try:
    with shell.entered():
        pg.run()
finally:
    state.flush_notes()
