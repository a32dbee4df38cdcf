"""The shared sidebar (rendered by the entry point on every page): model (preset or uploaded config.json), seed,
lesson mode. The three knobs live in the entry point, so their URL parameters survive page changes.

Pages read the result with ``shared()``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import streamlit as st

from app import state
from core.calc import param_counts
from core.units import human_count
from core.config import PRESETS, ConfigError, ModelConfig
from core.published import PAPER_FIGURES, billions

UPLOADED = "uploaded"
MAX_UPLOAD_BYTES = 256 * 1024  # a config.json is ~2 KB; refuse anything bigger than 256 KiB
# The released models carry their published totals (core.published); the small presets Eva's own count.
PRESET_LABELS = {
    "deepseek-v3": f"DeepSeek-V3 · {billions(PAPER_FIGURES['deepseek-v3']['total'])}",
    "deepseek-v2": f"DeepSeek-V2 · {billions(PAPER_FIGURES['deepseek-v2']['total'])}",
    "deepseek-v2-lite": f"DeepSeek-V2-Lite · {billions(PAPER_FIGURES['deepseek-v2-lite']['total'])}",
    "mini": f"mini · {human_count(param_counts(PRESETS['mini'])['total'])} (CPU-trainable)",
    "tiny": f"tiny · {human_count(param_counts(PRESETS['tiny'])['total'])} (unit-test size)",
}

_UP_JSON = "_eva_uploaded_json"     # the uploaded config as a normalized JSON string
_UP_NAME = "_eva_uploaded_name"
_UP_ERROR = "_eva_upload_error"
_UP_WARN = "_eva_upload_warning"
_UP_PREV = "_eva_preset_before_upload"


@dataclass(frozen=True)
class Shared:
    model: str            # preset name or "uploaded"
    model_id: str         # changes whenever the model changes (preset name or uploaded:<hash>)
    cfg_json: str         # hashable description of the config (to_hf JSON), for cached computations
    seed: int
    lesson: bool
    label: str            # human name of the model

    @property
    def cfg(self) -> ModelConfig:
        return ModelConfig.from_hf(json.loads(self.cfg_json))


# Fields that set the model's size: a config.json that leaves them out silently gets DeepSeek-V3's values (as
# transformers does), so the sidebar says which ones were filled in.
SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
               "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "kv_lora_rank",
               "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
_JSON_KIND = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
              type(None): "null"}


def display_name(name: str | None) -> str:
    """A browser-supplied file name, safe to show inside Markdown (no backticks/asterisks, at most 60 chars)."""
    n = "".join(c for c in str(name or "config.json") if c.isprintable() and c not in "`*[]<>\\|")
    n = n.strip() or "config.json"
    return n if len(n) <= 60 else n[:57] + "…"


def parse_config_upload(data: bytes, name: str = "config.json") -> tuple[str | None, str | None]:
    """(normalized config JSON, None) or (None, error message naming the field and the rule)."""
    cfg_json, err, _ = _parse_upload(data, name)
    return cfg_json, err


def _parse_upload(data: bytes, name: str) -> tuple[str | None, str | None, str | None]:
    """(normalized config JSON, error, warning). Never raises: every refusal is a readable message."""
    name = display_name(name)
    if len(data) > MAX_UPLOAD_BYTES:
        return None, f"**{name}** is {len(data) / 1024:.0f} KiB; a config.json is a few KiB (limit 256 KiB).", None
    if not data.strip():
        return None, f"**{name}** is empty; upload the model's config.json.", None
    try:
        text = data.decode("utf-8-sig")  # tolerate the byte-order mark some Windows editors write
    except UnicodeDecodeError:
        return None, f"**{name}** is not UTF-8 text; upload the model's config.json.", None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"**{name}** is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.", None
    except RecursionError:
        return None, f"**{name}** is nested too deeply to be a config.json.", None
    except ValueError:  # Python refuses integer literals of more than 4,300 digits
        return None, f"**{name}** holds a number too long to read (over 4,300 digits).", None
    if not isinstance(doc, dict):
        # (never hand a bare string to ModelConfig.from_hf: it would read it as a file path on the server)
        return None, (f"**{name}** must hold a JSON object (`{{\"hidden_size\": …, …}}`), "
                      f"not {_JSON_KIND.get(type(doc), 'a ' + type(doc).__name__)}."), None
    try:
        cfg = ModelConfig.from_hf(doc)
    except ConfigError as e:
        return None, f"**{name}** was rejected — field `{e.field}`: {e.rule}.", None
    except (TypeError, ValueError, RecursionError) as e:  # an unexpected value the validator does not name
        return None, f"**{name}** was rejected: {str(e)[:200]}.", None
    # The app needs the architecture only: unknown keys (kept by from_hf for a faithful round trip) would make
    # every cache key as large as the upload.
    cfg = cfg.replace(extra={})
    missing = [f for f in SIZE_FIELDS if f not in doc]
    warn = (f"**{name}** does not set {', '.join(f'`{f}`' for f in missing)}: DeepSeek-V3's values are used "
            "(as transformers does)." if missing else None)
    return json.dumps(cfg.to_hf(), sort_keys=True), None, warn


def _on_upload() -> None:
    f = st.session_state.get("upload")
    if f is None:  # file removed: forget it and go back to the preset used before
        st.session_state.pop(_UP_ERROR, None)
        st.session_state.pop(_UP_WARN, None)
        if st.session_state.get(_UP_JSON) is not None:
            st.session_state.pop(_UP_JSON, None)
            st.session_state.pop(_UP_NAME, None)
            if st.session_state.get("model") == UPLOADED:
                st.session_state["model"] = st.session_state.get(_UP_PREV, "deepseek-v3")
        return
    cfg_json, err, warn = _parse_upload(f.getvalue(), f.name)
    if err:  # keep the previous state, show the error
        st.session_state[_UP_ERROR] = err
        return
    st.session_state.pop(_UP_ERROR, None)
    if warn:
        st.session_state[_UP_WARN] = warn
    else:
        st.session_state.pop(_UP_WARN, None)
    if st.session_state.get("model") != UPLOADED:
        st.session_state[_UP_PREV] = st.session_state.get("model", "deepseek-v3")
    st.session_state[_UP_JSON] = cfg_json
    st.session_state[_UP_NAME] = display_name(f.name)
    st.session_state["model"] = UPLOADED


def render() -> Shared:
    """Draw the shared sidebar; returns the shared state (also available later via ``shared()``)."""
    sb = st.sidebar
    sb.markdown("**Model**")
    options = list(PRESET_LABELS)
    if st.session_state.get(_UP_JSON):
        options.append(UPLOADED)

    def fmt(o):
        return o

    model = state.selectbox(
        "Preset", "model", options, "deepseek-v3", fmt=fmt, container=sb,
        help="Architecture every page starts from. Page knobs default to this model's values.",
        invalid_hint="uploaded configs cannot travel in a link — upload the file again" if
        st.query_params.get("model") == UPLOADED else None)
    if model == UPLOADED:
        sb.caption(f"Uploaded: `{st.session_state.get(_UP_NAME, 'config.json')}`")
    sb.file_uploader("…or upload a config.json", type=["json"], key="upload", on_change=_on_upload,
                     max_upload_size=1, help="A Hugging Face DeepSeek-V2/V3 config.json (a few KiB). "
                     "Uploaded configs stay in this browser tab: they cannot be shared by link.")
    if st.session_state.get(_UP_ERROR):
        sb.error(st.session_state[_UP_ERROR], icon=":material/error:")
    elif model == UPLOADED and st.session_state.get(_UP_WARN):
        sb.warning(st.session_state[_UP_WARN], icon=":material/warning:")
    sh = shared()
    c = param_counts(sh.cfg)
    sb.caption(f"{human_count(c['total'])} parameters, {human_count(c['activated'])} activated per token")
    sb.divider()
    state.number("Seed", "seed", 0, min_value=0, max_value=2**31 - 1, step=1, container=sb,
                 help="Seeds every random weight and token stream, so a link reproduces the same numbers.")
    state.toggle("Lesson mode", "lesson", False, container=sb,
                 help="Opens every explanation and adds a 'what to notice' note under each chart.")
    return shared()


def shared() -> Shared:
    """The current shared state (model config, seed, lesson mode) from the sidebar's widgets."""
    model = st.session_state.get("model", "deepseek-v3")
    if model == UPLOADED and st.session_state.get(_UP_JSON):
        cfg_json = st.session_state[_UP_JSON]
        model_id = "uploaded:" + hashlib.sha1(cfg_json.encode()).hexdigest()[:10]
        label = st.session_state.get(_UP_NAME, "uploaded config.json")
    else:
        if model not in PRESETS:
            model = "deepseek-v3"
        cfg_json = _preset_json(model)
        model_id = model
        label = PRESET_LABELS.get(model, model)
    seed = st.session_state.get("seed", 0)
    seed = int(seed) if seed is not None else 0
    return Shared(model=model, model_id=model_id, cfg_json=cfg_json, seed=seed,
                  lesson=bool(st.session_state.get("lesson", False)), label=label)


@st.cache_data(max_entries=16, show_spinner=False)
def _preset_json(name: str) -> str:
    return json.dumps(PRESETS[name].to_hf(), sort_keys=True)
