"""Several processes (issue 13): torchrun + DDP on CPU/gloo against one process, a rank killed or stopped, and
the Study spread over processes. Real processes, real gloo; tiny images so that it runs on two CPU cores.

Tolerances (measured on a 2-core AMD EPYC, torch 2.14, fp32, no augmentation, dropout 0, 47 training images so
that the last global batch splits 7 + 8): level partial, 2 ranks x batch 8 against 1 process x batch 16, the
trainable BatchNorm synchronised: weights within 2.3e-5 (float summation order, amplified by 3 SGD steps at lr
0.01), every metric within 1e-5 -> asserted 1e-4 and 1e-3. Level fc (sharded feature pass, head trained alike on
every rank): bit for bit, dropout included -> asserted 1e-6 and 1e-6.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import small_config

TRAIN = ["--image-size", "64", "--cache-size", "96", "--weights", "none", "--precision", "fp32", "--workers", "2"]
METRICS = ("auc", "accuracy", "sensitivity", "specificity", "loss")


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """The demo set with 47 training images: a last global batch of 15 that splits unevenly over 2 ranks."""
    from covid_cls import make_demo_dataset

    root = make_demo_dataset(tmp_path_factory.mktemp("dist") / "data", n_per_class=24, size=96, seed=1)
    sorted((root / "train" / "normal").glob("*.png"))[0].unlink()
    return root


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "covid_cls",
            *args]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def _one_process(data: Path, out: Path, **over):
    """The reference run in this process, with one thread like each torchrun rank (OMP_NUM_THREADS=1)."""
    import torch

    from covid_cls import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(small_config(data, out, **over))
    finally:
        torch.set_num_threads(threads)


def _compare(one: Path, two: Path, weights_tol: float, metrics_tol: float) -> None:
    from covid_cls.checkpoints import load_checkpoint

    a, b = load_checkpoint(one), load_checkpoint(two)
    assert set(a.state) == set(b.state)
    worst = max((a.state[k].double() - b.state[k].double()).abs().max().item() for k in a.state
                if a.state[k].is_floating_point())
    assert worst <= weights_tol, f"weights differ by {worst}"
    for split in ("validation", "test"):
        for m in METRICS:
            assert a.card.metrics[split][m] == pytest.approx(b.card.metrics[split][m], abs=metrics_tol), (split, m)
    assert a.card.best_epoch == b.card.best_epoch
    assert a.card.threshold == pytest.approx(b.card.threshold, abs=metrics_tol)
    assert b.card.distributed["world_size"] == 2 and b.card.distributed["backend"] == "gloo"
    assert a.card.distributed["world_size"] == 1


# ---------------------------------------------------------------------------------------------------
# the pieces, without processes
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, bs", [(47, 8), (48, 8), (33, 8), (5, 2)])
def test_each_step_is_the_global_batch_cut_into_rank_parts(n, bs):
    """Concatenated over the ranks, every step is the one-process batch of bs x world; every rank takes the same
    number of steps; only a last global batch smaller than the world size is left out."""
    import torch

    from covid_cls.engine import _Batches

    x, y = torch.arange(n), torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    one = list(_Batches(x, y, bs * 2).steps(order))
    parts = [list(_Batches(x, y, bs, SimpleNamespace(active=True, world=2, rank=r)).steps(order)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1])
    full = len(one) if n % (2 * bs) != 1 else len(one) - 1
    assert len(parts[0]) == full
    for (xs, ys, m), p0, p1 in zip(one, *parts):
        assert torch.equal(torch.cat([p0[0], p1[0]]), xs) and p0[2] == p1[2] == m == len(ys)
        assert abs(len(p0[0]) - len(p1[0])) <= 1 and len(p0[0]) >= 1


def test_torchrun_command_passes_its_options_through():
    from covid_cls.distributed import torchrun_command

    cmd = torchrun_command(["train", "--data", "d", "--gpus", "4", "--nnodes=2", "--node_rank", "1",
                            "--rdzv-backend", "c10d", "--rdzv-endpoint", "host:29500", "--epochs", "3"], 4)
    i = cmd.index("-m", 3)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=4" in cmd
    assert cmd[3:i] == ["--nproc-per-node=4", "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "host:29500"]
    assert cmd[i:] == ["-m", "covid_cls", "train", "--data", "d", "--epochs", "3"]
    single = torchrun_command(["train", "--gpus=2", "--data", "d"], 2)
    assert "--standalone" in single and "--gpus=2" not in single


def test_devices_are_parsed_and_checked():
    from covid_cls.distributed import parse_devices
    from covid_cls.errors import ConfigError

    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    assert parse_devices(None) == []
    with pytest.raises(ConfigError, match="GPU"):
        parse_devices("0,1")      # no GPU here (and on a GPU machine: each listed once, within the count)
    with pytest.raises(ConfigError, match="unknown device"):
        parse_devices("tpu")


def test_gpus_without_a_gpu_says_how_to_use_cpu_processes(capsys):
    import torch

    from covid_cls.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", "--data", "x", "--gpus", "2"]) == 2
    assert "--device cpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# real processes
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow   # ~20 s: real processes; in CI's full run (all tiers), out of the fast tier
def test_two_ranks_train_the_model_one_process_trains(odd_data, tmp_path):
    """torchrun, 2 gloo ranks: partial (DDP, synchronised BatchNorm, uneven last batch) against one process with
    the same global batch; fc (via ``covid-cls train --gpus 2 --device cpu``) against one process. Rank 0 alone
    writes: one checkpoint and its card."""
    det = ["--no-augment", "--dropout", "0", "--optimizer", "sgd", "--lr", "0.01"]
    _run(_torchrun("train", "--data", str(odd_data), "--level", "partial", "--epochs", "2", "--batch-size", "8",
                   "--out", str(tmp_path / "p2"), *TRAIN, *det))
    _run([sys.executable, "-m", "covid_cls", "train", "--gpus", "2", "--device", "cpu", "--data", str(odd_data),
          "--level", "fc", "--epochs", "2", "--batch-size", "8", "--optimizer", "adam", "--out", str(tmp_path / "f2"),
          *TRAIN])
    p1 = _one_process(odd_data, tmp_path / "p1", level="partial", epochs=2, batch_size=16, augment=False,
                      dropout=0.0, optimizer="sgd", lr=0.01, precision="fp32")
    f1 = _one_process(odd_data, tmp_path / "f1", level="fc", epochs=2, batch_size=8, optimizer="adam",
                      precision="fp32")
    for out in ("p2", "f2"):
        assert len(list((tmp_path / out).iterdir())) == 2, list((tmp_path / out).iterdir())  # weights + card
    _compare(p1, next((tmp_path / "p2").glob("*.safetensors")), weights_tol=1e-4, metrics_tol=1e-3)
    _compare(f1, next((tmp_path / "f2").glob("*.safetensors")), weights_tol=1e-6, metrics_tol=1e-6)


def _children(pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (their environment says RANK)."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and "RANK" in env:
            ranks[int(env["RANK"])] = int(proc.name)
    return ranks


def _launch_and_signal(data: Path, out: Path, rank: int, sig: int) -> tuple[int, str, float]:
    """Start a long 2-rank run, send ``sig`` to one rank once training runs; (exit code, output, seconds from the
    signal to the end of torchrun)."""
    p = subprocess.Popen(_torchrun("train", "--data", str(data), "--level", "partial", "--epochs", "500",
                                   "--batch-size", "4", "--out", str(out), *TRAIN),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in p.stdout:
            lines.append(line)
            if "DDP over 2 ranks" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(180), "".join(lines)[-3000:]
        time.sleep(1.5)   # into the epochs
        ranks = _children(p.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[rank], sig)
        t0 = time.perf_counter()
        rc = p.wait(timeout=90)
        ended = time.perf_counter() - t0
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(5)
    return rc, "".join(lines), ended


@pytest.mark.slow   # ~9 s: real processes; in CI's full run
def test_killing_one_rank_ends_the_other_and_saves_nothing(odd_data, tmp_path):
    rc, out, seconds = _launch_and_signal(odd_data, tmp_path / "out", rank=1, sig=signal.SIGKILL)
    assert rc != 0
    assert "lost contact with another rank" in out, out[-3000:]   # rank 0's own message ...
    assert "rank      : 1" in out and "SIGKILL" in out             # ... and torchrun's summary naming rank 1
    assert seconds < 60
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_stop_on_one_rank_stops_both_at_the_same_step(odd_data, tmp_path):
    """SIGTERM (what Ctrl-C / torchrun send) to rank 0 only: every rank sees the stop at the next step, both end
    with "stopped", nothing is saved."""
    rc, out, seconds = _launch_and_signal(odd_data, tmp_path / "out", rank=0, sig=signal.SIGTERM)
    assert rc != 0
    assert out.count("stopped on request") >= 2, out[-3000:]   # both ranks
    assert "lost contact" not in out
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_study_on_two_cpu_processes_matches_the_sequential_study(odd_data, tmp_path):
    """--devices cpu,cpu: the runs in two spawned processes (1 thread each), the cache decoded once; the rows
    equal those of the sequential study run with one thread."""
    import torch

    from covid_cls.study import run_study

    base = small_config(odd_data, tmp_path / "par", epochs=1, precision="fp32")
    events = []
    par = run_study(base, archs=["resnet18"], levels=["fc", "partial"], devices="cpu,cpu", on_event=events.append)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = run_study(small_config(odd_data, tmp_path / "seq", epochs=1, precision="fp32"), archs=["resnet18"],
                        levels=["fc", "partial"])
    finally:
        torch.set_num_threads(threads)
    keys = ("arch", "level", "trainable_params", "best_val_auc", "test_accuracy", "test_sensitivity",
            "test_specificity", "test_auc", "test_auc_low", "test_auc_high", "vs_fc")
    assert [{k: r[k] for k in keys} for r in par] == [{k: r[k] for k in keys} for r in seq]
    assert {e.name for e in events if e.type == "run"} == {"resnet18·fc", "resnet18·partial"}
    assert sum(e.type == "done" for e in events) == 2


@pytest.mark.slow   # ~20 s: the app's training worker plus two device processes
def test_the_study_tab_runs_its_study_over_devices_in_the_training_worker(odd_data, tmp_path):
    """The Study tab's path (issue 13 #2): the app's daemonic training worker starts one process per device,
    the interleaved events keep a curve per run, and the job ends with both rows."""
    from covid_cls.ui import Services, Settings
    from covid_cls.ui.study import study_endpoint

    svc = Services(Settings(checkpoints=tmp_path / "ck", runs=tmp_path / "runs", roots_env=str(odd_data.parent),
                            study_devices_env="cpu,cpu"))
    *_, last = study_endpoint(svc, "server folder", str(odd_data), None, ["resnet18"], ["fc", "partial"],
                              1, 1e-3, "adam", "none", 64)
    progress, fig, table, log = last
    assert "study finished: 2 runs" in log and "2 runs on 2 device(s) in parallel: cpu, cpu" in log
    assert [row[:2] for row in table["data"]] == [["resnet18", "fc"], ["resnet18", "partial"]]
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"resnet18·fc", "resnet18·partial"}
    assert len(list((tmp_path / "ck").glob("*.safetensors"))) == 2


def test_a_device_worker_stops_when_its_parent_is_gone(monkeypatch):
    """A killed training worker leaves its device processes orphaned: they see it and stop at the next step."""
    import threading as th

    from covid_cls.distributed import _HaltOrOrphaned

    halt = th.Event()
    flag = _HaltOrOrphaned(halt)
    assert not flag.is_set()
    monkeypatch.setattr(os, "getppid", lambda: flag.parent + 1)   # re-parented (to init or a subreaper)
    assert flag.is_set()
    monkeypatch.undo()
    halt.set()
    assert flag.is_set()
