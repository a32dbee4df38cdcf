"""Eva — the DeepSeek-V3 Explorer: entry point (temporary minimal page until the app issue lands)."""
import streamlit as st

from core.calc import human_count, param_counts
from core.config import PRESETS

st.set_page_config(page_title="Eva — DeepSeek-V3 Explorer", layout="wide")
st.title("Eva — the DeepSeek-V3 Explorer")
name = st.selectbox("Preset", list(PRESETS), key="preset")
c = param_counts(PRESETS[name])
st.metric("Total parameters", human_count(c["total"]))
st.metric("Activated per token", human_count(c["activated"]))
