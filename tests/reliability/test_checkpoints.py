"""Broken checkpoint directories given to `python -m megatron_longalign.train` (issue 10):
every case either resumes from the right checkpoint and says so, or stops before
training with exit status 1 and one message that names the checkpoint, the file and the
`train.resume=<path>` to use instead; no traceback, and no complete checkpoint is ever
changed or deleted.

One short run (the smoke experiment on the session's small test dataset, 6 steps, a
checkpoint every 2) is trained once per module; every case copies its checkpoints into
a fresh directory and breaks them there.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from megatron_longalign.training.checkpoint import MARKER, read_marker
from tests.reliability.harness import Case, Setup, case_ids, python_command, run_case

pytestmark = pytest.mark.slow  # one subprocess per case (about 10 s each on 2 cores)

STEPS = ("step_00000002", "step_00000004", "step_00000006")
CHECKPOINT_EXIT = 1  # train.py: a CheckpointError stops the run with status 1


@dataclasses.dataclass(frozen=True)
class Trained:
    run: Path  # train.output_dir of the first run: run/checkpoints/step_{2,4,6} + latest
    prefix: str  # the dataset it trained on

    @property
    def checkpoints(self) -> Path:
        return self.run / "checkpoints"


def train_command(trained: Trained, run: Path, *overrides: str) -> list[str]:
    """The smoke experiment on the test dataset: tiny model, 256-token packs, a
    checkpoint every 2 steps, all of them kept."""
    return python_command(
        "-m",
        "megatron_longalign.train",
        "+experiment=smoke",
        f"train.output_dir={run}",
        f"data.sources=[{{prefix:'{trained.prefix}',weight:1.0}}]",
        "data.seq_length=256",
        "optim.lr_warmup_steps=1",
        "train.save_interval=2",
        "train.keep_last=null",
        "logging.log_interval=1",
        "logging.progress_bar=false",
        *overrides,
    )


@pytest.fixture(scope="module")
def trained(sample_prefixes, tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("trained")
    result = Trained(root / "run", sample_prefixes["short"])
    case = Case(
        "first run",
        lambda _: Setup(train_command(result, result.run, "train.max_steps=6")),
        exit_code=0,
        expect=[r"done: 6 steps"],
    )
    run_case(case, root / "unused")
    assert sorted(p.name for p in result.checkpoints.glob("step_*")) == list(STEPS)
    return result


def copy_run(trained: Trained, directory: Path) -> Path:
    """A copy of the trained run's checkpoints under directory/run/checkpoints."""
    run = directory / "run"
    shutil.copytree(trained.checkpoints, run / "checkpoints")
    return run


# ---- the cases -------------------------------------------------------------------------


def deleted_latest(directory: Path, trained: Trained) -> Setup:
    """The advice of an old error message: delete `latest`, resume. Must continue from
    the newest complete checkpoint (step 6), say so, and leave 2, 4 and 6 alone."""
    run = copy_run(trained, directory)
    ckpt = run / "checkpoints"
    (ckpt / "latest").unlink()
    return Setup(
        train_command(trained, run, "train.max_steps=8"),
        protected=[ckpt / name for name in STEPS],
        expect=[
            f"no `latest` in {ckpt}: resuming from the newest complete checkpoint "
            f"{ckpt / STEPS[-1]}",
            f"resumed from {ckpt / STEPS[-1]}: step 6",
        ],
    )


def garbage_latest(directory: Path, trained: Trained) -> Setup:
    run = copy_run(trained, directory)
    ckpt = run / "checkpoints"
    (ckpt / "latest").write_bytes(b"\x89\xe8\x00\xffstep_\x9c\x00garbage")
    return Setup(
        train_command(trained, run, "train.max_steps=8"),
        protected=[ckpt],
        expect=[f"{ckpt / 'latest'} is unreadable", f"train.resume={ckpt / STEPS[-1]}"],
    )


def broken_file(name: str, how: str) -> Callable[[Path, Trained], Setup]:
    """Damage `name` in the newest checkpoint (the one `latest` names): truncate it to
    half its size, empty it, delete it, or (same size) zero its last 512 bytes."""

    def prepare(directory: Path, trained: Trained) -> Setup:
        run = copy_run(trained, directory)
        ckpt = run / "checkpoints"
        target = ckpt / STEPS[-1] / name
        data = target.read_bytes()
        if how == "truncate":
            target.write_bytes(data[: len(data) // 2])
        elif how == "delete":
            target.unlink()
        elif how == "zero_tail":
            target.write_bytes(data[:-512] + bytes(512))
        return Setup(
            train_command(trained, run, "train.max_steps=8"),
            protected=[ckpt],
            expect=[
                f"checkpoint {ckpt / STEPS[-1]} ",
                str(target),
                f"train.resume={ckpt / STEPS[-2]}",
            ],
        )

    return prepare


def explicit_older_resume(directory: Path, trained: Trained) -> Setup:
    """train.resume=<step 2> while 4 and 6 exist: the run would save 4 and 6 again."""
    run = copy_run(trained, directory)
    ckpt = run / "checkpoints"
    return Setup(
        train_command(trained, run, "train.max_steps=8", f"train.resume={ckpt / STEPS[0]}"),
        protected=[ckpt],
        expect=[f"{ckpt} already has newer complete checkpoints {STEPS[1]}, {STEPS[2]}"],
    )


def fresh_start_over_checkpoints(directory: Path, trained: Trained) -> Setup:
    run = copy_run(trained, directory)
    ckpt = run / "checkpoints"
    return Setup(
        train_command(trained, run, "train.max_steps=8", "train.resume=never"),
        protected=[ckpt],
        expect=[f"{ckpt} already has complete checkpoints {', '.join(STEPS)}"],
    )


CASES = [
    Case(
        "deleted latest resumes from the newest complete checkpoint",
        deleted_latest,
        exit_code=0,
        expect=[r"done: 2 steps \(0 skipped\)"],
    ),
    Case("garbage latest", garbage_latest, CHECKPOINT_EXIT, [r"step_<N> directory name"]),
    Case(
        "truncated shard file",
        broken_file("__0_0.distcp", "truncate"),
        CHECKPOINT_EXIT,
        [
            r"not a complete checkpoint \(damaged or unfinished\): .*__0_0\.distcp has \d+ bytes, the save wrote \d+"
        ],
    ),
    Case(
        "truncated common.pt",
        broken_file("common.pt", "truncate"),
        CHECKPOINT_EXIT,
        [r"common\.pt has \d+ bytes"],
    ),
    Case(
        "truncated complete.json",
        broken_file(MARKER, "truncate"),
        CHECKPOINT_EXIT,
        [r"complete\.json is not valid JSON"],
    ),
    Case(
        "missing .metadata",
        broken_file(".metadata", "delete"),
        CHECKPOINT_EXIT,
        [r"\.metadata is missing"],
    ),
    Case(
        "empty metadata.json",
        broken_file("metadata.json", "truncate"),
        CHECKPOINT_EXIT,
        [r"metadata\.json has \d+ bytes"],
    ),
    Case(
        "corrupt common.pt of the right size",
        broken_file("common.pt", "zero_tail"),
        CHECKPOINT_EXIT,
        [r"could not be read \(RuntimeError: PytorchStreamReader.*common\.pt is corrupt"],
    ),
    Case(
        "explicit older resume with newer checkpoints present",
        explicit_older_resume,
        CHECKPOINT_EXIT,
        [r"would overwrite them", r"move step_00000004 step_00000006 out of"],
    ),
    Case(
        "fresh start over complete checkpoints",
        fresh_start_over_checkpoints,
        CHECKPOINT_EXIT,
        [r"train\.resume=never starts fresh", r"train\.checkpoint_dir"],
    ),
]


def after_deleted_latest(directory: Path) -> None:
    """The resumed run added step 8 and pointed `latest` at it."""
    ckpt = directory / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000008"
    assert read_marker(ckpt / "step_00000008")["step"] == 8
    assert sorted(p.name for p in ckpt.glob("step_*")) == [*STEPS, "step_00000008"]


AFTER = {CASES[0].name: after_deleted_latest}


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_checkpoint_case(case: Case, trained: Trained, tmp_path: Path) -> None:
    bound = dataclasses.replace(case, prepare=functools.partial(case.prepare, trained=trained))
    result = run_case(bound, tmp_path)
    output = result.stdout + result.stderr
    if case.exit_code != 0:
        # One message, before any training step ran.
        assert not re.search(r"step \d+ \| loss", output), output
    check = AFTER.get(case.name)
    if check is not None:
        check(tmp_path)
