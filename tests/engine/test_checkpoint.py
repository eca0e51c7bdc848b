import logging
import os
import pickle

import pytest
import torch

from sqakd.engine import atomic_torch_save, load_training_checkpoint, safe_torch_load


def test_atomic_save_keeps_previous_and_round_trips(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert safe_torch_load(path)["epoch"] == 2
    assert safe_torch_load(path.with_name("last.pt.prev"))["epoch"] == 1
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, path)
    atomic_torch_save({"epoch": 2, "w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a crash mid-write by some other tool
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("sqakd").addHandler(handler)
    try:
        state, used = load_training_checkpoint(path)
    finally:
        logging.getLogger("sqakd").removeHandler(handler)
    assert state["epoch"] == 1 and used.name == "last.pt.prev"
    assert any("using the previous checkpoint" in m and "truncated" in m for m in messages)


def test_truncated_without_previous_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1, "w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated, corrupt or not a plain weights file"):
        load_training_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pt"
    with path.open("wb") as stream:
        pickle.dump({"state_dict": exploit}, stream)
    with pytest.raises(ValueError, match="cannot be read safely"):
        safe_torch_load(path)
    assert not marker.exists()


def test_a_write_that_dies_midway_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, path)

    def dies_midway(state, stream):
        stream.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert safe_torch_load(path)["epoch"] == 1
    assert not path.with_name("last.pt.prev").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_temporary_files_left_by_a_killed_writer_are_removed(tmp_path):
    path = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.abc123.tmp"  # what SIGKILL during torch.save leaves
    stale.write_bytes(b"partial")
    atomic_torch_save({"epoch": 1}, path)
    assert not stale.exists() and safe_torch_load(path)["epoch"] == 1
