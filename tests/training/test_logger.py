"""MetricsLogger: console line format, wandb modes (disabled / offline, never the
network), run id and resume, and rank 0 only."""

from __future__ import annotations

import io
import socket
import sys
import threading
import types

import pytest

from megatron_longalign.config.training import LoggingConfig, WandbConfig
from megatron_longalign.training import logger as logger_module
from megatron_longalign.training.logger import (
    STEP_KEY,
    MetricsLogger,
    format_console_line,
    resolve_rank,
    resolve_wandb_mode,
)
from megatron_longalign.training.validate import logging_problems

METRICS = {
    "train/loss": 2.34567,
    "train/lr": 1e-5,
    "train/grad_norm": 1.5,
    "perf/tokens_per_sec": 12_345.6,
    "perf/tflops_per_gpu": 123.44,
    "perf/mfu": 0.41234,
    "data/packing_efficiency": 0.973,
    "data/rank_imbalance": 1.02,
    "mem/peak_gb": 12.3456,
    "perf/step_time_s": 1.25,
    "loss_by_len/0-512": 2.0,
}
LINE = (
    "step 100 | loss 2.3457 | lr 1.000e-05 | grad 1.500 | 12,346 tok/s | 123.4 TFLOP/s/GPU"
    " | MFU 41.2% | 1.250 s/step | fill 97.3% | imb 1.020 | mem 12.35 GiB"
)


def test_console_line_format():
    assert format_console_line(100, METRICS) == LINE


def test_console_line_without_a_peak_says_so_and_labels_cpu_memory():
    metrics = {k: v for k, v in METRICS.items() if k != "perf/mfu"}
    line = format_console_line(7, metrics, memory_label=" (cpu rss)")
    assert " | MFU n/a | " in line
    assert line.endswith("mem 12.35 GiB (cpu rss)")


@pytest.mark.parametrize(
    ("requested", "env", "mode"),
    [
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": "x" * 40}, "online"),
        ("auto", {"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}, "offline"),
        ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
        ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
        ("disabled", {"WANDB_API_KEY": "x" * 40}, "disabled"),
        ("offline", {"WANDB_API_KEY": "x" * 40}, "offline"),
        ("online", {}, "online"),
    ],
)
def test_wandb_mode_resolution(requested, env, mode):
    assert resolve_wandb_mode(requested, env) == mode


def offline(**wandb) -> LoggingConfig:
    return LoggingConfig(wandb=WandbConfig(mode="offline", **wandb))


def test_config_validation_names_the_field():
    # Each message names a field of the schema: logging.wandb.mode, not logging.wandb_mode.
    (problem,) = logging_problems(LoggingConfig(log_interval=0))
    assert problem.startswith("logging.log_interval must be >= 1")
    (problem,) = logging_problems(LoggingConfig(wandb=WandbConfig(mode="cloud")))
    assert problem.startswith("logging.wandb.mode='cloud'")
    (problem,) = logging_problems(LoggingConfig(wandb=WandbConfig(run_id="job/42")))
    assert problem.startswith("logging.wandb.run_id='job/42'")
    assert not logging_problems(LoggingConfig())


def test_rank_resolution(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert resolve_rank(1) == 1
    assert resolve_rank() == 3  # torchrun's RANK before init_process_group
    monkeypatch.delenv("RANK")
    assert resolve_rank() == 0


# ---- a recording stand-in for wandb ---------------------------------------------------


class FakeRun:
    def __init__(self, run_id):
        self.id = run_id or "generated-id"
        self.logged, self.defined, self.finished = [], [], False

    def define_metric(self, name, **kwargs):
        self.defined.append((name, kwargs))

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.SimpleNamespace(inits=[], runs=[])

    def init(**kwargs):
        module.inits.append(kwargs)
        module.runs.append(FakeRun(kwargs.get("id")))
        return module.runs[-1]

    module.init = init
    module.Settings = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_run_id_resumes_the_same_run(fake_wandb, tmp_path, monkeypatch):
    # As on a GPU: no "(cpu rss)" label after the memory figure.
    monkeypatch.setattr(logger_module, "peak_memory_source", lambda: "cuda max_memory_allocated")
    config = LoggingConfig(
        log_interval=5,
        wandb=WandbConfig(
            mode="offline",
            project="p",
            entity="e",
            run_name="n",
            tags=["a", "b"],
            dir=str(tmp_path / "wb"),
            run_id="slurm-1234",
        ),
    )
    stream = io.StringIO()
    logger = MetricsLogger(config, rank=0, run_config={"seed": 1}, stream=stream)
    (kwargs,) = fake_wandb.inits
    assert kwargs["id"] == "slurm-1234" and kwargs["resume"] == "allow"
    assert kwargs["mode"] == "offline"
    assert (kwargs["project"], kwargs["entity"], kwargs["name"]) == ("p", "e", "n")
    assert kwargs["tags"] == ["a", "b"] and kwargs["config"] == {"seed": 1}
    assert kwargs["dir"] == str(tmp_path / "wb") and (tmp_path / "wb").is_dir()
    assert logger.run_id == "slurm-1234"
    run = fake_wandb.runs[0]
    assert (STEP_KEY, {}) in run.defined and ("*", {"step_metric": STEP_KEY}) in run.defined

    assert not logger.log(7, METRICS)  # not a logging step
    assert logger.log(10, METRICS)
    assert logger.log(11, {"train/loss": 1.0}, force=True)  # e.g. the last step
    assert run.logged == [{STEP_KEY: 10, **METRICS}, {STEP_KEY: 11, "train/loss": 1.0}]
    assert stream.getvalue().splitlines() == [
        LINE.replace("step 100", "step 10"),
        "step 11 | loss 1.0000",
    ]
    logger.close()
    assert run.finished


def test_without_run_id_wandb_picks_one_and_logger_exposes_it(fake_wandb):
    logger = MetricsLogger(offline(), rank=0, stream=io.StringIO())
    assert fake_wandb.inits[0]["id"] is None and fake_wandb.inits[0]["resume"] is None
    logger.close()
    assert logger.run_id == "generated-id"  # for the checkpoint, to resume this run


def test_run_id_argument_continues_that_run(fake_wandb):
    """The trainer passes the run id its checkpoint stored (or logging.wandb.run_id)."""
    logger = MetricsLogger(offline(run_id="from-config"), rank=0, run_id="from-checkpoint")
    assert fake_wandb.inits[0]["id"] == "from-checkpoint" and logger.run_id == "from-checkpoint"
    logger.close()


def test_other_ranks_log_nothing(fake_wandb, capsys):
    stream = io.StringIO()
    logger = MetricsLogger(
        LoggingConfig(log_interval=1, wandb=WandbConfig(mode="online")), rank=1, stream=stream
    )
    assert fake_wandb.inits == []  # no wandb run at all
    assert not logger.log(1, METRICS, force=True)
    logger.close()
    assert stream.getvalue() == "" and capsys.readouterr().out == ""


def test_rank_from_environment_when_not_given(fake_wandb, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    logger = MetricsLogger(offline(), stream=io.StringIO())
    assert logger.rank == 2 and not logger.enabled and fake_wandb.inits == []


def test_disabled_mode_never_imports_wandb(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would fail
    logger = MetricsLogger(
        LoggingConfig(log_interval=1, wandb=WandbConfig(mode="disabled")), rank=0
    )
    assert logger.log(3, {"train/loss": 0.5})
    logger.close()
    assert capsys.readouterr().out == "step 3 | loss 0.5000\n"


def test_missing_wandb_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"set logging\.wandb\.mode=disabled"):
        MetricsLogger(offline(), rank=0)


# ---- real wandb, offline, with a network tripwire ---------------------------------------


class Tripwire:
    """A local TCP server that records every connection. wandb's API base URL and the
    HTTP(S) proxies point at it, so any HTTP request from wandb (Python or its Go
    service) lands here instead of the internet."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    import wandb

    tripwire = Tripwire()
    for key in ("WANDB_API_KEY", "WANDB_MODE", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_BASE_URL", tripwire.url)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(key, tripwire.url)
    # Outbound connections from this process to anything but loopback or a unix socket.
    outbound = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            outbound.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield types.SimpleNamespace(tripwire=tripwire, outbound=outbound, dir=tmp_path)
    tripwire.close()
    # wandb keeps its settings (read from the environment) in a process-wide singleton.
    wandb.teardown()


def test_offline_run_writes_locally_and_never_touches_the_network(offline_env):
    config = LoggingConfig(log_interval=1, wandb=WandbConfig(mode="auto", run_id="requeue-7"))
    # auto, no API key
    stream = io.StringIO()
    logger = MetricsLogger(config, rank=0, run_config={"model": "tiny"}, stream=stream)
    assert logger.mode == "offline" and logger.run_id == "requeue-7"
    logger.log(1, METRICS)
    logger.log(2, {**METRICS, "train/loss": 1.5})
    logger.close()
    # The requeued job: same id, resume="allow", a second offline segment of the run.
    again = MetricsLogger(config, rank=0, stream=stream)
    again.log(3, METRICS)
    again.close()

    runs = sorted(offline_env.dir.glob("wandb/offline-run-*-requeue-7"))
    assert runs, "the offline run directory"
    assert all((run / "run-requeue-7.wandb").stat().st_size > 0 for run in runs)
    assert [line.split(" | ")[0] for line in stream.getvalue().splitlines()] == [
        "step 1",
        "step 2",
        "step 3",
    ]
    assert offline_env.tripwire.connections == 0
    assert offline_env.outbound == []
