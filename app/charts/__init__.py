"""Pure chart builders, one module per dashboard (`app.charts.mla` draws `pages/mla.py`): DataFrame in, plotly
Figure out (no Streamlit, no torch, no math beyond unit scaling).

Conventions (DESIGN.md): the title says what to notice (the subtitle gives the numbers), axes carry units,
hover shows values, colours come from `app.palette` (same colour for the same thing on every page),
heatmaps use viridis / cividis. Shared layout helpers live in `app.charts.layout`.
"""
# The dashboards' modules as attributes: after `from app import charts`, `charts.mla.<builder>` works.
from app.charts import fp8, layout, mla, moe, overview  # noqa: F401
