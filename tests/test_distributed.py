"""Data- and expert-parallel training on gloo processes (torchrun) against one process (issue #15).

All launches start together in one module fixture (they are independent) and each has a timeout, so a hang
fails the test instead of blocking CI. The single-process reference trains in this process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import gemm
from core.comm import a2a_volume, exchange_bytes, hit_probability, token_bytes, CommError
from core.config import get_preset
from core.parallel import ParallelError, ParallelPlan, validate_plan
from core.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420  # per launch (all run at once; a loaded 2-core box took 260 s); a hang fails, not blocks
STEPS = 20
ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16", "--eval-every", "0",
        "--dataset", "synthetic", "--seed", "3", "--warmup", "2", "--gamma", "0.01", "--device", "cpu", "--quiet"]


def _train_cfg() -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=4, seq_len=16, eval_every=0, dataset="synthetic", seed=3, warmup=2,
                       gamma=0.01)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env["EVA_FP32_GEMM"] = "torch"  # the auto backend is chosen by timing per process: fix it so ranks agree
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, rdzv: list[str] | None = None) -> list[str]:
    launcher = ["--standalone"] if rdzv is None else rdzv
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node", str(nproc), *args]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Start every multi-process job at once, train the one-process reference meanwhile, then collect."""
    tmp = tmp_path_factory.mktemp("dist")
    cli = ["-m", "core.train", *ARGS]
    port = _free_port()

    def node(rank: int) -> list[str]:
        rdzv = ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "eva-two-nodes"]
        return _torchrun(1, *cli, "--dp", "2", "--ep", "2", "--json", str(tmp / "nodes.json"), rdzv=rdzv)

    jobs = {
        "dp2": _torchrun(2, *cli, "--dp", "2", "--json", str(tmp / "dp2.json")),
        "dp2ep2": _torchrun(2, *cli, "--dp", "2", "--ep", "2", "--json", str(tmp / "dp2ep2.json"),
                            "--save", str(tmp / "ckpt")),
        "dp4ep2": _torchrun(4, *cli, "--dp", "4", "--ep", "2", "--json", str(tmp / "dp4ep2.json")),
        "node0": node(0),
        "node1": node(1),
        "moe": _torchrun(2, str(ROOT / "tests" / "dist_ep_worker.py"), str(tmp / "moe.json")),
        "bad": _torchrun(2, *cli, "--dp", "2", "--ep", "3"),
    }
    procs = {k: subprocess.Popen(v, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, v in jobs.items()}
    with gemm.using("torch"):
        ref = train("tiny", _train_cfg())
        ref.run()
    done = {}
    try:
        for k, p in procs.items():
            out, err = p.communicate(timeout=TIMEOUT_S)
            done[k] = (p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    return {"tmp": tmp, "ref": ref, "done": done}


def _records(launches, name: str) -> list[dict]:
    rc, out, err = launches["done"][name]
    assert rc == 0, f"{name} failed (rc {rc}):\n{err[-3000:]}"
    return json.loads((launches["tmp"] / f"{name}.json").read_text())


def _assert_same_run(recs: list[dict], ref) -> None:
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    ref_losses = [r["loss"] for r in ref.records]
    assert max(abs(a["loss"] - b) for a, b in zip(recs, ref_losses)) < 1e-4
    assert recs[-1]["expert_loads"] == ref.records[-1]["expert_loads"]  # global loads of the global batch
    bias = torch.tensor(recs[-1]["router_bias"])
    assert bias.abs().max() > 0  # the bias controller moved the biases ...
    torch.testing.assert_close(bias, torch.tensor(ref.records[-1]["router_bias"]), rtol=0, atol=1e-7)  # ... alike


@pytest.mark.parametrize("name", ["dp2", "dp2ep2", "dp4ep2"])
def test_parallel_runs_match_one_process(launches, name):
    recs = _records(launches, name)
    _assert_same_run(recs, launches["ref"])
    ep = {"dp2": 1, "dp2ep2": 2, "dp4ep2": 2}[name]
    assert all(r["ep"] == ep and r["dp"] == r["world_size"] for r in recs)
    if ep == 1:
        assert all(r["a2a_bytes"] == 0 for r in recs)
    else:  # experts are exchanged, all inside the one node
        assert all(r["a2a_bytes"] > 0 and r["a2a_bytes_inter_node"] == 0 for r in recs)


def test_two_nodes_match_one_process(launches):
    """Two torchrun invocations of one process each (--nnodes 2, c10d rendezvous on 127.0.0.1)."""
    for k in ("node0", "node1"):
        assert launches["done"][k][0] == 0, launches["done"][k][2][-3000:]
    recs = json.loads((launches["tmp"] / "nodes.json").read_text())
    _assert_same_run(recs, launches["ref"])
    # one rank per node: every expert byte that leaves a rank crosses the node boundary; the routing is the one of
    # the single-node --dp 2 --ep 2 run, so each step sends the same bytes
    assert all(r["a2a_bytes_inter_node"] == r["a2a_bytes"] > 0 for r in recs)
    assert [r["a2a_bytes"] for r in recs] == [r["a2a_bytes"] for r in _records(launches, "dp2ep2")]


def test_checkpoint_of_two_processes_loads_in_one(launches):
    from core.checkpoint import load_hf
    _records(launches, "dp2ep2")
    model = load_hf(launches["tmp"] / "ckpt")
    ref_model = launches["ref"].model
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with gemm.using("torch"), torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), rtol=0, atol=1e-4)
    for a, b in zip(model.moe_layers(), ref_model.moe_layers()):
        torch.testing.assert_close(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias, rtol=0, atol=1e-7)


def test_expert_parallel_layer_and_bytes_match(launches):
    """One MoE layer split over 2 ranks = the layer on one process; exchanged bytes = core.comm's count."""
    rc, _, err = launches["done"]["moe"]
    assert rc == 0, err[-3000:]
    res = json.loads((launches["tmp"] / "moe.json").read_text())
    for what, diff in res["diffs"].items():
        assert diff < 1e-5, what
    assert res["forward_bytes"] == res["predicted"]["off_rank"] > 0
    assert res["forward_inter_node"] == res["predicted"]["inter_node"]
    assert res["backward_bytes"] == res["forward_bytes"]  # the gradients retrace both exchanges


def test_bad_combination_stops_every_rank(launches):
    rc, out, err = launches["done"]["bad"]
    assert rc != 0
    for rank in (0, 1):
        assert f"[rank {rank}] error: --ep: must divide --dp (2)" in err


@pytest.mark.parametrize("plan,world,batch,flag", [
    (ParallelPlan(2, 1), 4, 4, "--dp"),         # D != world size
    (ParallelPlan(2, 1), 1, 4, "--dp"),         # not launched with torchrun
    (ParallelPlan(4, 3), 4, 4, "--ep"),         # E does not divide D
    (ParallelPlan(6, 6), 6, 6, "--ep"),         # E does not divide the 8 experts
    (ParallelPlan(4, 2), 4, 6, "--batch-size"),  # 6 sequences do not split over 4 ranks
    (ParallelPlan(0, 1), 1, 4, "--dp"),
])
def test_validate_plan_names_the_flag(plan, world, batch, flag):
    with pytest.raises(ParallelError) as e:
        validate_plan(plan, world, get_preset("tiny").n_routed_experts, batch)
    assert str(e.value).startswith(flag + ":") and e.value.flag == flag


def test_cli_bad_flag_returns_before_any_collective(monkeypatch, capsys):
    from core.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([*ARGS, "--dp", "2", "--batch-size", "3"]) == 2
    assert "[rank 1] error: --batch-size: must be divisible by --dp (2)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the calculator
def test_token_bytes_hand_counts():
    assert token_bytes(7168, "bf16") == 14336
    assert token_bytes(7168, "fp8") == 7168 + 56 * 4  # 56 tiles of 128, one fp32 scale each
    assert token_bytes(100, "fp8") == 100 + 4  # a ragged last tile still has a scale
    with pytest.raises(CommError, match="dtype"):
        token_bytes(8, "int4")


def _enumerate_expected(n, k, ep, nodes, m):
    """Brute force over every equally likely routing choice of a token on rank 0 (node 0)."""
    from itertools import combinations
    per_node, per_rank = n // nodes, n // ep
    node_sets = list(combinations(range(nodes), m))
    slots = rnodes = rranks = 0.0
    total = 0
    for ns in node_sets:
        pool = [e for nd in ns for e in range(nd * per_node, (nd + 1) * per_node)]
        for choice in combinations(pool, k):
            ranks = {e // per_rank for e in choice}
            slots += sum(e // per_rank != 0 for e in choice)
            rranks += len(ranks - {0})
            rnodes += len({r // (ep // nodes) for r in ranks} - {0})
            total += 1
    return slots / total, rranks / total, rnodes / total


@pytest.mark.parametrize("n,k,ep,nodes,m", [(8, 2, 4, 2, None), (8, 3, 4, 2, 1), (12, 3, 6, 3, 2), (16, 4, 8, 4, 2)])
def test_a2a_volume_matches_enumeration(n, k, ep, nodes, m):
    cfg = get_preset("tiny").replace(n_routed_experts=n, num_experts_per_tok=k, n_group=1, topk_group=1)
    v = a2a_volume(cfg, ep, nodes, m, dispatch="fp32", combine="fp32")
    slots, ranks, rnodes = _enumerate_expected(n, k, ep, nodes, m or nodes)
    assert v["slots_off_rank"] == pytest.approx(slots)
    assert v["remote_ranks_expected"] == pytest.approx(ranks)
    assert v["remote_nodes_expected"] == pytest.approx(rnodes)
    row = 2 * cfg.hidden_size * 4
    assert v["bytes_off_rank"] == pytest.approx(slots * row)
    assert v["bytes_inter_node_dedup"] == pytest.approx(rnodes * row)


def test_a2a_volume_deepseek_v3_layout():
    """V3: 256 experts, 8 per token, EP64 over 8 nodes, at most 4 nodes per token (§2.1.2, §3.2)."""
    v = a2a_volume(get_preset("deepseek-v3"), ep=64, nodes=8, node_limit=4)
    assert v["dispatch_token_bytes"] == 7392 and v["combine_token_bytes"] == 14336
    assert v["slots_off_rank"] == 8 * 63 / 64
    assert v["nodes_per_token_max"] == 4 and v["bytes_inter_node_max"] == 4 * (7392 + 14336)
    free = a2a_volume(get_preset("deepseek-v3"), ep=64, nodes=8)
    # node limiting cuts the expected IB copies (dedup per node) and caps them at 4 instead of 8
    p = 1 - (torch.arange(96, 88, -1).double() / torch.arange(128, 120, -1).double()).prod().item()
    assert v["remote_nodes_expected"] == pytest.approx(7 * 0.5 * p)
    assert v["remote_nodes_expected"] < free["remote_nodes_expected"] and free["nodes_per_token_max"] == 8
    assert hit_probability(10, 5, 6) == 1.0


@pytest.mark.parametrize("kw,knob", [(dict(ep=3), "ep"), (dict(ep=8, nodes=3), "nodes"),
                                     (dict(ep=8, nodes=4, node_limit=5), "node_limit"),
                                     (dict(ep=8, nodes=8, node_limit=1), "node_limit")])
def test_a2a_volume_rejects_bad_layouts(kw, knob):
    cfg = get_preset("tiny")  # 8 experts, 2 per token
    with pytest.raises(CommError) as e:
        a2a_volume(cfg, **kw)
    assert e.value.knob == knob


def test_exchange_bytes_hand_count():
    # 4 experts on 2 ranks (0-1 | 2-3), one rank per node, 10 + 20 bytes per copy
    idx0 = torch.tensor([[0, 3], [1, 2]])  # rank 0: one remote slot per token
    idx1 = torch.tensor([[0, 1], [3, 2]])  # rank 1: first token needs rank 0 twice, second stays home
    got = exchange_bytes([idx0, idx1], 4, 2, 1, 10, 20)
    assert got == {"off_rank": 4 * 30, "inter_node": 4 * 30, "off_rank_dedup": 3 * 30, "inter_node_dedup": 3 * 30}
    same_node = exchange_bytes([idx0, idx1], 4, 2, 2, 10, 20)
    assert same_node["inter_node"] == 0 and same_node["off_rank"] == 120
