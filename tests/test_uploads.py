"""Uploads and checkpoints (issue 7, item 3): a config.json upload is size-capped; every bad document gets a clear
message and leaves the current model and every other knob untouched; a valid one works. Checkpoints load from
safetensors only, and nothing in the repository unpickles anything (AST scan).

Layers:
* `app.sidebar.parse_config_upload` on a table of bad documents (fast, no UI): never raises, always a message
  that names the file and the problem (the field and the rule, where there is one);
* the same documents uploaded through the sidebar of a running app (AppTest) on a page whose knobs were moved
  away from their defaults: no exception, the message is shown, the model, every widget value and every chart's
  data are exactly as before;
* `core.checkpoint.load_hf` against pickles in disguise (a malicious pickle never runs), corrupt headers.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from apptest_helpers import HANG_S

from app.sidebar import MAX_UPLOAD_BYTES, parse_config_upload
from core.config import PRESETS
from core.published import PUBLISHED_CONFIGS

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
V3 = PUBLISHED_CONFIGS["deepseek-v3"]
LITE = PUBLISHED_CONFIGS["deepseek-v2-lite"]


def doc(**kw) -> bytes:
    return json.dumps(dict(V3, **kw)).encode()


def many_keys_under_cap() -> bytes:
    """A valid config padded with thousands of unknown keys, just under the cap."""
    d = dict(V3)
    i = 0
    while True:
        d[f"unused_key_{i:05d}"] = i
        i += 1
        if i % 500 == 0 and len(json.dumps(d)) > MAX_UPLOAD_BYTES - 20_000:
            break
    data = json.dumps(d).encode()
    assert len(data) <= MAX_UPLOAD_BYTES
    return data


# name -> (bytes, words the message must contain)  — all refused
BAD = {
    "too big (300 KiB)": (b"{" + b" " * 300_000 + b"}", ["KiB", "256"]),
    "too big (5 MiB of valid JSON)": (json.dumps({"x": "a" * 5_000_000}).encode(), ["KiB"]),
    "invalid JSON": (b'{"hidden_size": 64,,}', ["not valid JSON", "line 1"]),
    "truncated JSON": (doc()[:200], ["not valid JSON"]),
    "non-UTF-8 bytes": (b"\xff\xfe{\x00}\x00\x80\x81", ["not UTF-8"]),
    "latin-1 text": ('{"model_type": "d\xe9j\xe0"}'.encode("latin-1"), ["not UTF-8"]),
    "empty file": (b"", ["empty"]),
    "only whitespace": (b" \n\t ", ["empty"]),
    "a JSON array": (b"[1, 2, 3]", ["JSON object", "array"]),
    "a JSON string (a path on the server!)": (b'"/etc/hostname"', ["JSON object", "string"]),
    "a JSON number": (b"42", ["JSON object", "number"]),
    "null": (b"null", ["JSON object", "null"]),
    "deeply nested arrays (100k)": (b"[" * 100_000 + b"]" * 100_000, ["nested"]),
    "deeply nested objects (40k)": (b'{"a":' * 40_000 + b"1" + b"}" * 40_000, ["nested"]),
    "deeply nested in a field": (doc()[:-1] + b', "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", ["nested"]),
    "a 5,000-digit integer": (b'{"hidden_size": ' + b"9" * 5000 + b"}", ["number", "4,300"]),
    "hidden_size as a string": (doc(hidden_size="7168"), ["`hidden_size`", "integer"]),
    "hidden_size true": (doc(hidden_size=True), ["`hidden_size`", "integer"]),
    "hidden_size a list": (doc(hidden_size=[7168]), ["`hidden_size`"]),
    "hidden_size an object": (doc(hidden_size={"v": 1}), ["`hidden_size`"]),
    "hidden_size 7168.5": (doc(hidden_size=7168.5), ["`hidden_size`", "integer"]),
    "hidden_size null": (doc(hidden_size=None), ["`hidden_size`"]),
    "hidden_size 10**12": (doc(hidden_size=10**12), ["`hidden_size`", "too large"]),
    "hidden_size -1": (doc(hidden_size=-1), ["`hidden_size`"]),
    "hidden_size 0": (doc(hidden_size=0), ["`hidden_size`"]),
    "hidden_size NaN": (doc(hidden_size=float("nan")), ["`hidden_size`"]),
    "hidden_size Infinity": (doc(hidden_size=float("inf")), ["`hidden_size`"]),
    "hidden_size 1e999": (doc()[:-1] + b', "hidden_size": 1e999}', ["`hidden_size`"]),
    "num_hidden_layers 10**6": (doc(num_hidden_layers=10**6), ["`num_hidden_layers`", "too large"]),
    "vocab_size -(10**5000)": (doc()[:-1] + b', "vocab_size": -1' + b"0" * 4000 + b"}", ["`vocab_size`"]),
    "rms_norm_eps NaN": (doc(rms_norm_eps=float("nan")), ["`rms_norm_eps`", "finite"]),
    "routed_scaling_factor 1e300": (doc(routed_scaling_factor=1e300), ["`routed_scaling_factor`"]),
    "scoring_func relu": (doc(scoring_func="relu"), ["`scoring_func`"]),
    "n_group 7 (256 experts)": (doc(n_group=7), ["`n_group`", "divisible"]),
    "top-k > experts": (doc(num_experts_per_tok=300), ["`num_experts_per_tok`"]),
    "rope_scaling a string": (doc(rope_scaling="yarn"), ["`rope_scaling`"]),
    "rope_scaling factor NaN": (doc(rope_scaling=dict(V3["rope_scaling"], factor=float("nan"))), ["rope_scaling"]),
}

# name -> (bytes, words a *warning* must contain or None) — accepted
GOOD = {
    "published DeepSeek-V3": (json.dumps(V3).encode(), None),
    "with a UTF-8 byte-order mark": (b"\xef\xbb\xbf" + json.dumps(LITE).encode(), None),
    "empty object: every size field missing": (b"{}", ["does not set", "`hidden_size`", "DeepSeek-V3"]),
    "hidden_size missing": (json.dumps({k: v for k, v in V3.items() if k != "hidden_size"}).encode(),
                            ["`hidden_size`"]),
    "thousands of unknown keys, under the cap": (many_keys_under_cap(), None),
    "a 200 KB string in an unknown key": (doc(notes="x" * 200_000), None),
    "duplicate keys (last wins)": (b'{"hidden_size": 1, "hidden_size": 2048}', ["does not set"]),
    "unicode and control characters in strings": (doc(model_type="deepseek_v3\u0000\u202e🚀\ud800"), None),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_json_gets_a_clear_message(name):
    data, words = BAD[name]
    cfg_json, err = parse_config_upload(data, "config.json")
    assert cfg_json is None, name
    assert err and "config.json" in err, err
    for w in words:
        assert w.lower() in err.lower(), (name, err)
    assert len(err) < 600 and "Traceback" not in err, err


@pytest.mark.parametrize("name", list(GOOD))
def test_acceptable_config_json(name):
    from app.sidebar import _parse_upload
    data, words = GOOD[name]
    cfg_json, err, warn = _parse_upload(data, "config.json")
    assert err is None and cfg_json, (name, err)
    assert len(cfg_json) < 4096, "unknown keys are dropped: the cache key stays a few KiB"
    if words:
        for w in words:
            assert warn and w in warn, (name, warn)
    elif name != "duplicate keys (last wins)":
        assert warn is None, warn


def test_file_name_is_sanitized_for_markdown():
    _, err = parse_config_upload(b"[]", "`evil`**[x](javascript:alert(1))**" + "a" * 500 + ".json")
    assert "`evil`" not in err and "[x]" not in err and "a" * 100 not in err, err


# ---------------------------------------------------------------- through the running app
KINDS = ("slider", "select_slider", "selectbox", "radio", "number_input", "toggle", "checkbox")


def snapshot(at: AppTest) -> dict:
    """Every keyed widget's value and every chart's data: what "untouched" means."""
    vals = {}
    for kind in KINDS:
        for w in getattr(at, kind):
            if w.key:
                vals[(kind, w.key)] = w.value
    charts = [json.dumps(json.loads(c.proto.spec).get("data"), sort_keys=True) for c in at.get("plotly_chart")]
    return {"widgets": vals, "charts": charts, "metrics": [(m.label, m.value) for m in at.metric]}


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.get("file_uploader")[0].upload(name, data, "application/json")
    return at.run()


def moved_session(page: str = "pages/mla.py") -> AppTest:
    """A session on `page` with the model, the seed, lesson mode and page knobs moved off their defaults."""
    at = AppTest.from_file(APP, default_timeout=HANG_S)
    at.query_params.update({"model": "deepseek-v2-lite", "seed": "5", "lesson": "true", "mla_ctx": "32K",
                            "mla_dtype": "fp8", "mla_layers": "20"})
    at.switch_page(page)
    at.run()
    assert not at.exception
    return at


def test_bad_uploads_leave_model_and_every_knob_untouched():
    at = moved_session()
    before = snapshot(at)
    assert before["widgets"][("selectbox", "model")] == "deepseek-v2-lite"
    assert before["widgets"][("number_input", "seed")] == 5
    assert before["widgets"][("slider", "mla_layers")] == 20
    for name, (data, words) in BAD.items():
        upload(at, "config.json", data)
        assert not at.exception, (name, [e.value for e in at.exception])
        errs = " ".join(e.value for e in at.sidebar.error)
        assert errs, f"{name}: no st.error in the sidebar"
        assert all(w.lower() in errs.lower() for w in words), (name, errs)
        after = snapshot(at)
        assert after == before, f"{name}: the upload changed the state"


def test_valid_upload_then_bad_upload_keeps_the_uploaded_model_then_removal_restores_the_preset():
    from core.calc import param_counts
    from core.units import human_count
    at = AppTest.from_file(APP, default_timeout=HANG_S)
    at.query_params.update({"model": "mini", "seed": "3"})
    at.run()
    upload(at, "my-config.json", json.dumps(LITE).encode())
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="model").value == "uploaded"
    total = human_count(param_counts(PRESETS["deepseek-v2-lite"])["total"])
    assert any(m.value == total for m in at.metric if m.label == "Total parameters")
    assert "my-config.json" in " ".join(c.value for c in at.sidebar.caption)
    good = snapshot(at)
    upload(at, "broken.json", b"{")
    assert not at.exception
    assert "broken.json" in " ".join(e.value for e in at.sidebar.error)
    assert snapshot(at) == good, "a bad upload must keep the uploaded model shown before it"
    at.get("file_uploader")[0].set_value(None)
    at.run()
    assert not at.exception and not at.error
    assert at.selectbox(key="model").value == "mini"
    assert at.number_input(key="seed").value == 3


def test_missing_fields_upload_warns_which_values_were_filled_in():
    at = AppTest.from_file(APP, default_timeout=HANG_S)
    at.run()
    upload(at, "partial.json", json.dumps({"num_hidden_layers": 4}).encode())
    assert not at.exception and not at.error
    assert at.selectbox(key="model").value == "uploaded"
    warn = " ".join(w.value for w in at.sidebar.warning)
    assert "`hidden_size`" in warn and "`num_hidden_layers`" not in warn, warn


def test_uploaded_model_cannot_travel_in_a_link():
    at = AppTest.from_file(APP, default_timeout=HANG_S)
    at.query_params["model"] = "uploaded"
    at.run()
    assert not at.exception
    assert at.selectbox(key="model").value == "deepseek-v3"
    assert "upload the file again" in " ".join(w.value for w in at.warning)


# ---------------------------------------------------------------- checkpoints: safetensors only, never unpickle
class _Evil:
    """A pickle that would create a marker file if anything ever unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from core.checkpoint import save_hf
    from core.model import DeepSeekV3
    import torch
    torch.manual_seed(0)
    save_hf(DeepSeekV3(PRESETS["tiny"]), tmp_path)
    return tmp_path


def test_pickles_in_disguise_are_refused_and_never_run(tiny_checkpoint, tmp_path_factory):
    import torch

    from core.checkpoint import CheckpointError, load_hf
    marker = tmp_path_factory.mktemp("m") / "unpickled"
    st_file = tiny_checkpoint / "model.safetensors"
    good = st_file.read_bytes()
    for make in (lambda p: p.write_bytes(pickle.dumps(_Evil(marker))),          # raw pickle
                 lambda p: torch.save({"w": _Evil(marker)}, p)):                  # torch.save zip archive
        make(st_file)
        with pytest.raises(CheckpointError, match="safetensors"):
            load_hf(tiny_checkpoint)
        assert not marker.exists(), "a pickle was executed"
    # a malicious pytorch_model.bin beside valid safetensors is ignored, not opened
    st_file.write_bytes(good)
    (tiny_checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    load_hf(tiny_checkpoint)
    assert not marker.exists()
    # only a .bin: refused with a hint, still never opened
    st_file.unlink()
    with pytest.raises(CheckpointError, match="pickle formats are refused"):
        load_hf(tiny_checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("header", [struct.pack("<Q", 2**63) + b"{}",
                                    struct.pack("<Q", 200) + b'{"a": {"dtype": "F32", "shape": [1000000000000], '
                                                             b'"data_offsets": [0, 4000000000000]}}' + b" " * 150,
                                    b"", b"\x00" * 7],
                         ids=["header length 2**63", "lying tensor size", "empty file", "7 bytes"])
def test_corrupt_safetensors_headers_are_refused(tiny_checkpoint, header):
    from core.checkpoint import CheckpointError, load_hf
    (tiny_checkpoint / "model.safetensors").write_bytes(header)
    with pytest.raises(CheckpointError):
        load_hf(tiny_checkpoint)


def _index_to(folder: Path, weights: Path, name: str) -> None:
    """Write model.safetensors.index.json in `folder` mapping every tensor of `weights` to file `name`."""
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_index_cannot_point_outside_the_checkpoint_folder(tiny_checkpoint, tmp_path_factory, how):
    from core.checkpoint import CheckpointError, load_hf
    outside = tmp_path_factory.mktemp("outside") / "w.safetensors"
    os.replace(tiny_checkpoint / "model.safetensors", outside)
    name = str(outside) if how == "absolute" else os.path.relpath(outside, tiny_checkpoint)
    _index_to(tiny_checkpoint, outside, name)
    with pytest.raises(CheckpointError):
        load_hf(tiny_checkpoint)


@pytest.mark.parametrize("text", ["{not json", "[]"])
def test_malformed_index_is_a_checkpoint_error(tiny_checkpoint, text):
    from core.checkpoint import CheckpointError, load_hf
    (tiny_checkpoint / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError):
        load_hf(tiny_checkpoint)


# ---------------------------------------------------------------- nothing in the repo unpickles
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"),
              ("cPickle", "loads"), ("_pickle", "load"), ("_pickle", "loads"), ("dill", "load"), ("dill", "loads"),
              ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("marshal", "load"),
              ("marshal", "loads"), ("shelve", "open"), ("cloudpickle", "load"), ("cloudpickle", "loads")}
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", "artifacts", ".pytest_cache"}


def _py_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                yield Path(dirpath) / f


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _const_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_nothing_in_the_repo_unpickles():
    """AST scan of every .py file: no pickle/dill/joblib/marshal loading, no `torch.load` without
    `weights_only=True`, no `numpy.load(..., allow_pickle=True)`, no direct unpickling imports."""
    offenders = []
    files = list(_py_files())
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "cPickle", "dill",
                                                                     "joblib", "marshal", "cloudpickle"):
                bad = [a.name for a in node.names if a.name in ("load", "loads", "Unpickler")]
                if bad:
                    offenders.append(f"{where}: from {node.module} import {bad}")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            head, _, last = name.rpartition(".")
            kw = {k.arg: k.value for k in node.keywords}
            if (head.split(".")[-1] if head else "", last) in UNPICKLERS:
                offenders.append(f"{where}: {name}()")
            elif last == "load" and head.split(".")[-1] == "torch" and not _const_true(kw.get("weights_only")):
                offenders.append(f"{where}: {name}() without weights_only=True")
            elif last == "load" and head.split(".")[-1] in ("np", "numpy") and _const_true(kw.get("allow_pickle")):
                offenders.append(f"{where}: {name}(allow_pickle=True)")
    assert not offenders, offenders


def test_the_scan_would_catch_an_unpickler(tmp_path):
    """The scanner itself works (guards against a scan that silently finds nothing)."""
    src = ("import pickle, torch\nimport numpy as np\npickle.loads(b'')\ntorch.load('x')\n"
           "torch.load('x', weights_only=True)\nnp.load('x', allow_pickle=True)\n")
    tree = ast.parse(src)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, last = name.rpartition(".")
            kw = {k.arg: k.value for k in node.keywords}
            if (head, last) in UNPICKLERS or (last == "load" and head == "torch"
                                              and not _const_true(kw.get("weights_only"))) or \
                    (last == "load" and head == "np" and _const_true(kw.get("allow_pickle"))):
                hits.append(name)
    assert hits == ["pickle.loads", "torch.load", "np.load"], hits
