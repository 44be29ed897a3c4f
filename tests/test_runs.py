"""Run folders: manifest first, atomic writes, overwrite/resume policy, round trips."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from catlens.runs import RunDir, atomic_path, load_table


def test_manifest_written_first_and_finished(tmp_path):
    run = RunDir.create(tmp_path / "r", config={"layer": 3}, seed=7)
    m = run.manifest
    assert m["config"] == {"layer": 3} and m["seed"] == 7 and m["status"] == "running"
    assert {"torch", "transformer-lens", "catlens"} <= set(m["versions"])
    assert "git_commit" in m
    run.record_data("builtin", {"sha256": "abc"})
    run.finish(n=3)
    m = run.manifest
    assert m["status"] == "done" and m["summary"] == {"n": 3} and m["data"]["builtin"]["sha256"] == "abc"


def test_table_round_trip_and_outputs_registered(tmp_path):
    run = RunDir.create(tmp_path / "r")
    table = pd.DataFrame({"layer": [0, 1], "category": ["a", None], "value": [0.5, float("nan")]})
    run.save_table("t", table)
    pd.testing.assert_frame_equal(load_table(tmp_path / "r" / "t"), table)
    assert (tmp_path / "r" / "t.csv").exists()
    outputs = run.manifest["outputs"]
    assert outputs["t.parquet"]["rows"] == 2 and len(outputs["t.parquet"]["sha256"]) == 64


def test_timed_phases_add_up_in_the_manifest_even_when_the_phase_fails(tmp_path):
    import time

    run = RunDir.create(tmp_path / "run")
    with run.timed("fit"):
        time.sleep(0.05)
    with run.timed("fit"):
        time.sleep(0.05)
    with pytest.raises(KeyError), run.timed("test"):
        raise KeyError("boom")
    timings = run.manifest["timings"]
    assert set(timings) == {"fit", "test"} and 0.1 <= timings["fit"] < 5 and timings["test"] >= 0


def test_refuses_non_empty_folder_unless_told(tmp_path):
    run = RunDir.create(tmp_path / "r")
    run.save_json("x", {"a": 1})
    with pytest.raises(FileExistsError, match="--overwrite"):
        RunDir.create(tmp_path / "r")
    resumed = RunDir.create(tmp_path / "r", resume=True)
    assert (resumed.path / "x.json").exists() and len(resumed.manifest["resumed"]) == 1
    RunDir.create(tmp_path / "r", overwrite=True)
    assert not (tmp_path / "r" / "x.json").exists()
    with pytest.raises(ValueError, match="exclude each other"):
        RunDir.create(tmp_path / "r", overwrite=True, resume=True)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_jsonl_append_and_torn_line(tmp_path):
    run = RunDir.create(tmp_path / "r")
    run.append_jsonl("c", [{"a": 1}, {"a": 2}])
    with open(tmp_path / "r" / "c.jsonl", "a") as f:
        f.write('{"a": 3')  # a crash mid-line
    assert run.read_jsonl("c") == [{"a": 1}, {"a": 2}]


def test_import_touches_nothing(tmp_path):
    """`import catlens` opens no file outside the interpreter, no socket, and imports no heavy module."""
    code = (
        "import sys, builtins, socket\n"
        "opened = []\n"
        "real_open = builtins.open\n"
        "builtins.open = lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1]\n"
        "def no_net(*a, **k): raise AssertionError('network touched')\n"
        "socket.socket.connect = no_net\n"
        "import catlens\n"
        "heavy = [m for m in ('torch', 'transformers', 'transformer_lens', 'sklearn', 'plotly') if m in sys.modules]\n"
        "print(opened, heavy)\n"
        "assert not opened and not heavy, (opened, heavy)\n"
        "assert catlens.Site.RESID_POST.value == 'resid_post'\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "CATLENS_CACHE": str(tmp_path / "c")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "c").exists()
