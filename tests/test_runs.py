"""The run directory contract and its pure-Python reader."""

import json
import subprocess
import sys

import pytest

from tune.durable import write_atomic
from tune.errors import TuneError
from tune.runs import RunDir, list_runs, read_metrics, read_run


def test_create_write_read_finish(tmp_path):
    run = RunDir.create(tmp_path / "r", "lora", "seed = 1\n")
    for sub in ("samples", "checkpoints", "export", "eval"):
        assert (tmp_path / "r" / sub).is_dir()
    run.log_metrics(0, loss=1.5)
    run.log_metrics(10, loss=0.5, lr=1e-4)
    run.sample_dir(10)
    run.checkpoint_dir(10).mkdir(parents=True)
    run.checkpoint_dir(20).mkdir(parents=True)  # incomplete: no marker
    run.mark_checkpoint_complete(10)
    (run.export_dir / "x.safetensors").write_bytes(b"")
    run.update_info(base_model="models/world-base")

    info = read_run(tmp_path / "r")
    assert info.status == "running"  # the lock is held
    assert info.recipe == "lora" and info.config == {"seed": 1}
    assert [m["loss"] for m in info.metrics] == [1.5, 0.5]
    assert info.last_step == 10 and info.sample_steps == [10] and info.checkpoint_steps == [10]
    assert [p.name for p in info.exports] == ["x.safetensors"]
    assert info.info["base_model"] == "models/world-base"

    run.finish()
    assert read_run(tmp_path / "r").status == "done"
    assert [r.path.name for r in list_runs(tmp_path)] == ["r"]


def test_crashed_when_writer_is_gone(tmp_path):
    run = RunDir.create(tmp_path / "r", "lora", "")
    run.close()  # as if the process died: the kernel drops its lock
    assert read_run(tmp_path / "r").status == "crashed"


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path):
    run = RunDir.create(tmp_path / "r", "lora", "")
    with pytest.raises(TuneError, match="in use by pid"):
        RunDir.create(tmp_path / "r", "lora", "", resume=True)
    run.close()
    RunDir.create(tmp_path / "r", "lora", "", resume=True).close()


def test_lock_held_by_another_process(tmp_path):
    code = (
        "import sys, time; from tune.runs import RunDir; "
        f"run = RunDir.create({str(tmp_path / 'r')!r}, 'lora', ''); print('ready', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert read_run(tmp_path / "r").status == "running"
        with pytest.raises(TuneError, match="in use"):
            RunDir.create(tmp_path / "r", "lora", "", resume=True)
    finally:
        proc.kill()
        proc.wait()
    assert read_run(tmp_path / "r").status == "crashed"


def test_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine.txt").write_text("keep")
    with pytest.raises(TuneError, match="already holds files"):
        RunDir.create(tmp_path / "r", "lora", "")
    assert (tmp_path / "r" / "mine.txt").read_text() == "keep"
    (tmp_path / "f").write_text("x")
    with pytest.raises(TuneError, match="is a file"):
        RunDir.create(tmp_path / "f", "lora", "")
    done = RunDir.create(tmp_path / "d", "lora", "")
    done.finish()
    with pytest.raises(TuneError, match="already holds a finished run"):
        RunDir.create(tmp_path / "d", "lora", "")


def test_torn_metrics_line_is_ignored(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(p) == [{"step": 1, "loss": 1.0}]


def test_write_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "a.txt"
    write_atomic(p, "one")
    write_atomic(p, b"two")
    assert p.read_text() == "two"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_reader_does_not_import_torch(tmp_path):
    RunDir.create(tmp_path / "r", "lora", "").finish()
    code = f"import sys; from tune.runs import read_run; read_run({str(tmp_path / 'r')!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    import pytest

    from tune.durable import atomic_file

    target = tmp_path / "out" / "weights.safetensors"
    target.parent.mkdir()
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half of the sec")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["weights.safetensors"]  # no temp file left


def test_resume_keeps_the_command_that_started_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tune", "run", "vae", "max_steps=6000", f"output_dir={tmp_path / 'r'}"])
    RunDir.create(tmp_path / "r", "vae", "").close()
    monkeypatch.setattr(sys, "argv", ["tune", "run", "vae", "--config", "r/config.toml", "resume=latest"])
    RunDir.create(tmp_path / "r", "vae", "", resume=True).close()
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["argv"][3] == "max_steps=6000"
    assert info["resume_argv"][-1] == "resume=latest" and "resumed_at" in info
