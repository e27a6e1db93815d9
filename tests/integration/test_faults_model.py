"""Corrupt model files: the worker and ``score`` refuse them with one line on stderr; no payload runs.

Three corruptions of a real checkpoint: truncated (half the file), tampered (one byte of a weight
tensor flipped, which only the model_version integrity check can notice) and a pickle whose
``__reduce__`` would create a marker file if it were ever unpickled with code execution allowed.
No broker is needed: the model is loaded before anything connects.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from demandstream.model.data.synth import generate, write_jsonl
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: Bound for one CLI run (torch import and model load on a busy 2-core box).
CLI_TIMEOUT_S = 120


class Payload:
    """Unpickling this calls ``os.system`` — exactly what a weights-only loader must refuse to do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def tampered(src: Path, dst: Path) -> Path:
    """Flip one byte in the middle of the largest tensor's storage (torch's zip stores it uncompressed)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # local file header: 30 fixed bytes + name + extra field, then the stored bytes
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def malicious_zip(dst: Path, marker: Path) -> Path:
    torch.save({"format": "demandstream-checkpoint/1", "config": Payload(marker)}, dst)
    return dst


def malicious_pickle(dst: Path, marker: Path) -> Path:
    dst.write_bytes(pickle.dumps({"format": "demandstream-checkpoint/1", "config": Payload(marker)}))
    return dst


def run_cli(args: list[str], model: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMANDSTREAM_")}
    env.update(
        {
            "DEMANDSTREAM_MODEL": str(model),
            "DEMANDSTREAM_DATA_DIR": str(tmp_path / "data"),
            "DEMANDSTREAM_BROKER": "kafka://127.0.0.1:1",
            "DEMANDSTREAM_DEVICE": "cpu",
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "demandstream.stream", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
    )


CORRUPTIONS = [
    "truncated",
    "tampered",
    "malicious_zip",
    "malicious_pickle",
]
#: Words the single error line must contain for each corruption (it names the problem and the file).
EXPECTED_WORDS = {
    "truncated": ["cannot read"],
    "tampered": ["integrity"],
    "malicious_zip": ["refusing", "pickled objects"],
    "malicious_pickle": ["refusing", "pickled objects"],
}


@pytest.mark.parametrize("command", ["worker", "score"])
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_checkpoint_is_refused(corruption, command, small_model, tmp_path):
    marker = tmp_path / "payload-ran"
    bad = tmp_path / f"{corruption}.pt"
    if corruption == "truncated":
        truncated(small_model, bad)
    elif corruption == "tampered":
        tampered(small_model, bad)
    elif corruption == "malicious_zip":
        malicious_zip(bad, marker)
    else:
        malicious_pickle(bad, marker)
    if command == "worker":
        args = ["worker"]
    else:
        data = tmp_path / "events.jsonl"
        write_jsonl(generate(5, 50, seed=1), data)
        args = ["score", "--model", str(bad), "--data", str(data), "--out", str(tmp_path / "signals.jsonl")]

    proc = run_cli(args, bad, tmp_path)

    stderr = proc.stderr.decode(errors="replace")
    assert not marker.exists(), "the pickle's payload ran"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr
    assert str(bad) in lines[0] and all(w in lines[0] for w in EXPECTED_WORDS[corruption]), lines[0]
    assert not (tmp_path / "signals.jsonl").exists() or (tmp_path / "signals.jsonl").stat().st_size == 0


@pytest.mark.parametrize("make", [malicious_zip, malicious_pickle])
def test_malicious_payload_never_runs(make, tmp_path):
    """The safety half of the CLI test, kept separate so no xfail can hide it."""
    from demandstream.model.core.checkpoint import CheckpointError, load

    marker = tmp_path / "payload-ran"
    with pytest.raises(CheckpointError):
        load(make(tmp_path / "evil.pt", marker))
    assert not marker.exists()


def test_payload_would_run_under_plain_pickle(tmp_path):
    """The control: the malicious file really executes code when loaded without weights_only."""
    marker = tmp_path / "payload-ran"
    bad = malicious_pickle(tmp_path / "evil.pt", marker)
    pickle.loads(bad.read_bytes())
    assert marker.exists()
