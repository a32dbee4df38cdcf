"""The masterclass notebook executes top to bottom (nbclient, a python3 kernel running this interpreter), uses no
Streamlit, and draws its charts with the app's chart builders. The executed copy goes to artifacts/notebooks/."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / "notebooks" / "masterclass.ipynb"
OUT = ROOT / "artifacts" / "notebooks"
TIMEOUT_S = 600


def _kernel_name() -> str:
    """A kernel spec that runs *this* interpreter (so the notebook sees the same packages): the registered
    `python3` if it points here, otherwise one installed on the fly for the current user (ipykernel's install)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        exe = spec.argv[0] if spec.argv else ""
        # jupyter_client runs a spec whose argv[0] is "python" / "python3" / "python3.X" with sys.executable
        if exe in ("python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]) or \
                Path(exe).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install
    install(user=True, kernel_name="eva-python3", display_name="Python 3 (eva tests)")
    return "eva-python3"


def test_masterclass_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NB, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "streamlit" not in source, "the notebook uses core and the chart builders, never Streamlit"
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert len(headings) == 6, headings
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=_kernel_name(),
                                     resources={"metadata": {"path": str(NB.parent)}})
    client.execute()
    elapsed = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, OUT / "masterclass.executed.ipynb")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    # the lab's loss curve is a Vega-Lite chart: altair's default renderer writes it as HTML that embeds the spec
    vega = [o["data"]["text/html"] for o in outputs if "vegaEmbed" in o.get("data", {}).get("text/html", "")]
    assert len(figures) + len(vega) >= 12, (len(figures), len(vega))
    for f in figures:  # every chart has a title that says what to notice
        assert json.loads(json.dumps(f["data"]["application/vnd.plotly.v1+json"]))["layout"]["title"]["text"]
    assert all("The loss falls" in html for html in vega) and vega, "the loss curve, with its title"
    print(f"\nnotebook executed in {elapsed:.0f} s")
