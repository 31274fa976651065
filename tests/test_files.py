"""Files written whole (harmonica/files.py), one run per directory, damaged run directories as one line.

A full disk is simulated (tests/_faults.py: a short write, then ENOSPC) during each writer: the command
exits with status 2 and one line naming the file and the cause, the destination keeps its previous bytes
(or does not exist) and no temporary file is left. Two real trainings on one directory: the second fails at
once naming the holder. `harmonica bench --suite digits` under SIGTERM leaves no worker."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _faults import ENV, damage_bytes, full_disk
from _helpers import patch_cli
from PIL import Image

from harmonica import cli
from harmonica.cli import sample as cli_sample
from harmonica.files import LOCK_FILE, RunLock, WriteError, append_line, write_file, write_files

TESTS = Path(__file__).parent
NO_SPACE = os.strerror(errno.ENOSPC)
TINY_DIT = ["sample", "--model", "tiny-dit", "--random-weights", "--steps", "2"]


def train_argv(out, *extra) -> list:
    return ["train", "--model", "tiny-dit", "--random-weights", "--objective", "iepo", "--steps", "3", "--iterations",
            "2", "--batch", "1", "--lambda-batch", "1", "--refresh", "2", "--out", str(out), *extra]


def files_under(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def last_error(capsys) -> str:
    """The last line on stderr (after any progress bars), which must be the error (no traceback: the subprocess
    tests see the whole stderr; here a library's logging handler may complain about an earlier test's capture)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def no_space_line(path) -> str:
    return f"harmonica: error: {path}: expected to write it, got {NO_SPACE} (nothing written)"


# ---- the helpers ----


def test_write_file_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    write_file(path, "old\n")
    os.chmod(path, 0o640)
    write_file(path, b"new\n")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"new\n" and (path.stat().st_mode & 0o777) == 0o666 & ~umask  # as open() gives
    monkeypatch.setattr(os, "write", full_disk("a.json"))
    with pytest.raises(WriteError) as error:
        write_file(path, b"x" * 100_000)
    assert str(error.value) == f"{path}: expected to write it, got {NO_SPACE} (nothing written)"
    assert error.value.errno == errno.ENOSPC and os.listdir(tmp_path) == ["a.json"]
    assert path.read_bytes() == b"new\n"


def test_files_written_together_change_none_when_one_fails(tmp_path, monkeypatch):
    first, second = tmp_path / "weights.bin", tmp_path / "info.json"
    write_files({first: b"w1", second: "i1"})
    monkeypatch.setattr(os, "write", full_disk("info.json"))
    with pytest.raises(WriteError, match="info.json: expected to write it"):
        write_files({first: b"w2", second: "i2"})
    assert files_under(tmp_path) == {"info.json": b"i1", "weights.bin": b"w1"}


def test_append_line_cuts_a_failed_line_back(tmp_path, monkeypatch):
    log, fresh = tmp_path / "log.jsonl", tmp_path / "fresh.jsonl"
    append_line(log, '{"iteration": 1}')
    monkeypatch.setattr(os, "write", full_disk(".jsonl"))
    for path in (log, fresh):
        with pytest.raises(WriteError, match=f"^{path}: expected to write it"):
            append_line(path, '{"iteration": 2, "loss": 0.5}')
    assert log.read_bytes() == b'{"iteration": 1}\n' and not fresh.exists()


def test_every_writer_goes_through_the_helpers():
    """No file is written but by harmonica/files.py: an open() for writing, write_text, save_file, or a save
    that does not write into `file_bytes` elsewhere in the package is a writer that can leave a partial file."""
    writer = re.compile(r"\.write_text\(|\.write_bytes\(|\bsave_file\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']"
                        r"|\.(save|savefig)\((?!f[,)])")
    root = TESTS.parent
    found = [f"{path.relative_to(root)}:{number}: {line.strip()}"
             for folder in ("harmonica", "bench", "profiling", "kernels")
             for path in sorted((root / folder).rglob("*.py"))
             if path.name != "files.py"
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if writer.search(line) and "file_bytes(lambda f:" not in line]
    assert found == []


# ---- every writer of the commands under a full disk ----


def test_sample_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    """The latents of a flow model (the PNG writer: test_the_real_command_on_a_full_disk)."""
    name = "x.safetensors"
    out = tmp_path / name
    out.write_bytes(b"previous")
    monkeypatch.setattr(os, "write", full_disk(name))
    assert cli.main(["sample", "--model", "tiny-flux", "--random-weights", "--steps", "2", "--out", str(out)]) == 2
    assert last_error(capsys) == no_space_line(out)
    assert files_under(tmp_path) == {name: b"previous"}


def test_an_animation_on_a_full_disk_is_not_written(tmp_path, monkeypatch):
    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    cli_sample.write_images(frames, tmp_path / "ok.gif")
    assert Image.open(tmp_path / "ok.gif").n_frames == 3
    monkeypatch.setattr(os, "write", full_disk("x.gif"))
    with pytest.raises(WriteError, match="x.gif: expected to write it"):
        cli_sample.write_images(frames, tmp_path / "x.gif")
    assert sorted(os.listdir(tmp_path)) == ["ok.gif"]


@pytest.mark.parametrize("target", ["checkpoint-rank0.pt", "train_log.jsonl", "router.json"])
def test_train_on_a_full_disk_names_the_file(target, tmp_path, monkeypatch, capsys):
    """The first write of `target` fails: the command stops there, and that file is not left half-written (the
    router's two files are written together: neither appears)."""
    out = tmp_path / "run"
    monkeypatch.setattr(os, "write", full_disk(target))
    assert cli.main(train_argv(out)) == 2
    path = out / ("router" if target == "router.json" else "") / target
    assert last_error(capsys) == no_space_line(path)
    left = files_under(out)
    assert not [name for name in left if name.endswith(".tmp") or name.startswith(".")]
    assert target not in {Path(name).name for name in left} and "router/router.safetensors" not in left
    if target != "train_log.jsonl":  # the records before the failure, whole
        assert [json.loads(line)["iteration"] for line in left["train_log.jsonl"].splitlines()] == [1, 2]


def test_embed_on_a_full_disk(tmp_path, monkeypatch, capsys):
    from harmonica import prompts

    class Encoders:
        def to(self, device):
            return self

    patch_cli(monkeypatch, "load_text_encoders", lambda *args, **kwargs: Encoders())
    monkeypatch.setattr(prompts, "encode_prompts", lambda *args: {"prompt_embeds": torch.zeros(1, 2, 4)})
    (tmp_path / "prompts.txt").write_text("a cat\n")
    out = tmp_path / "e.safetensors"
    monkeypatch.setattr(os, "write", full_disk(out.name))
    assert cli.main(["embed", "--model", "tiny-pixart", "--prompts", str(tmp_path / "prompts.txt"),
                     "--out", str(out)]) == 2
    assert last_error(capsys) == no_space_line(out)
    assert sorted(os.listdir(tmp_path)) == ["prompts.txt"]


def test_bench_results_on_a_full_disk(tmp_path, monkeypatch, capsys):
    from harmonica.bench import command

    monkeypatch.setattr(command, "_host_cost", lambda: [])
    monkeypatch.setattr(command, "mac_table", lambda: [])
    monkeypatch.setattr(command, "format_mac_table", lambda rows: "")
    monkeypatch.setattr(command, "machine_info", lambda: {"date": "2026-12-01T00:00", "commit": "abc1234"})
    out = tmp_path / "r.json"
    monkeypatch.setattr(os, "write", full_disk(out.name))
    assert cli.main(["bench", "--part", "kernels", "--out", str(out), "--no-progress"]) == 2
    assert last_error(capsys) == no_space_line(out)
    assert os.listdir(tmp_path) == []


def test_the_real_command_on_a_full_disk(tmp_path):
    """`python -m harmonica sample` with os.write failing (a sitecustomize): one line, no file."""
    (tmp_path / "sitecustomize.py").write_text("from _faults import install_from_env\ninstall_from_env()\n")
    out = tmp_path / "x.png"
    env = {**os.environ, ENV: "x.png", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS)])}
    result = subprocess.run([sys.executable, "-m", "harmonica", *TINY_DIT, "--out", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == no_space_line(out)
    assert sorted(os.listdir(tmp_path)) == ["sitecustomize.py"]


# ---- damaged run directories ----


def damage(path: Path, case: str) -> None:
    if damage_bytes(path, case):
        return
    if case == "missing-key":
        state = torch.load(path, weights_only=True)
        del state["optimizer"]
        torch.save(state, path)
    elif case == "log":
        path.with_name("train_log.jsonl").write_text('{"iteration": 1}\n{"iter')


RESUME_CASES = {
    "empty": r"--resume: expected a file written by torch.save, got \S+checkpoint-rank0.pt \(an empty file\)",
    "truncated": r"--resume: expected a file written by torch.save, got \S+checkpoint-rank0.pt \(",
    "random-bytes": r"--resume: expected a file written by torch.save, got \S+checkpoint-rank0.pt \(",
    "missing-key": r"--resume: expected a checkpoint with the keys .* at \S+checkpoint-rank0.pt, missing "
                   r"\['optimizer'\]",
    "log": r"--resume: expected a JSON record with an iteration on each line of \S+train_log.jsonl, got line 2",
}


def test_a_damaged_run_directory_is_one_line_naming_the_file(tmp_path, capsys):
    good = tmp_path / "good"
    assert cli.main(train_argv(good)) == 0
    for case, message in RESUME_CASES.items():
        run = tmp_path / case
        run.mkdir()
        for path in good.rglob("*"):
            if path.is_file():
                (run / path.relative_to(good)).parent.mkdir(exist_ok=True)
                (run / path.relative_to(good)).write_bytes(path.read_bytes())
        damage(run / "checkpoint-rank0.pt", case)
        before = files_under(run)
        capsys.readouterr()
        assert cli.main(train_argv(run, "--iterations", "4", "--resume")) == 2, case
        line = last_error(capsys)
        assert line.startswith("harmonica: error: ") and re.search(message, line), line
        assert files_under(run) == before, case
    # an old log alone is a run: a fresh start refuses it and removes nothing
    old = tmp_path / "old-log"
    old.mkdir()
    (old / "train_log.jsonl").write_text('{"iteration": 1}\n')
    assert cli.main(train_argv(old)) == 2
    assert re.search(r"--out: expected a directory without a training run, got \S+ holding train_log.jsonl; pass "
                     r"--resume to continue it or --overwrite", last_error(capsys))
    assert files_under(old) == {"train_log.jsonl": b'{"iteration": 1}\n'}


def test_the_real_command_names_a_truncated_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-rank0.pt").write_bytes(b"PK\x03\x04" + os.urandom(60))
    result = subprocess.run([sys.executable, "-m", "harmonica", *train_argv(run, "--resume")], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"harmonica: error: --resume: expected a file written by torch.save, got "
                        rf"{run}/checkpoint-rank0.pt \(.*\)", line), line
    assert sorted(os.listdir(run)) == ["checkpoint-rank0.pt"]


# ---- one run per directory ----


def test_a_second_training_on_a_held_directory_fails_at_once(tmp_path):
    run = tmp_path / "run"
    long_run = [sys.executable, "-m", "harmonica", *train_argv(run)]
    long_run[long_run.index("--iterations") + 1] = "100000"
    first = subprocess.Popen(long_run, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run / LOCK_FILE
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().startswith(f"pid {first.pid} ")):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        start = time.monotonic()
        second = subprocess.run(long_run, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and time.monotonic() - start < 60
        assert second.stderr.strip().splitlines() == [
            f"harmonica: error: --out: expected a run directory no other run uses, got {run} held by pid {first.pid} "
            f"on host {os.uname().nodename} (its lock file {lock}); wait for it or use another directory"]
        assert first.poll() is None  # the holder runs on
    finally:
        first.kill()  # a crash: the kernel drops its lock, its lock file stays
        first.wait()
    assert lock.read_text().startswith(f"pid {first.pid} ")
    with RunLock(run) as held:  # the stale lock is taken over
        assert lock.read_text() == f"pid {os.getpid()} on host {os.uname().nodename}\n"
        with pytest.raises(ValueError, match=rf"held by pid {os.getpid()} "):
            RunLock(run).__enter__()
    assert not lock.exists() and held.fd is None and run.is_dir()


def test_a_lock_on_a_new_directory_leaves_nothing(tmp_path):
    with RunLock(tmp_path / "new" / "run"):
        assert os.listdir(tmp_path / "new" / "run") == [LOCK_FILE]
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r"^--out: expected a directory, got \S+ \(a file\)"):
        (tmp_path / "file").write_text("")
        RunLock(tmp_path / "file").__enter__()


# ---- the digits suite's workers end with it ----


def children(pid: int) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def command_line(pid: int) -> bytes:
    """The command line of `pid`; b"" for a process that ended between its listing and this read."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_to_the_digits_suite_leaves_no_worker(tmp_path):
    suite = subprocess.Popen([sys.executable, "-m", "harmonica", "bench", "--suite", "digits", "--quick", "--out",
                              str(tmp_path)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        workers = []
        while len(workers) < 2:
            assert suite.poll() is None and time.monotonic() < deadline, "no worker started"
            workers = [pid for pid in children(suite.pid) if b"spawn_main" in command_line(pid)]
            time.sleep(0.1)
        suite.send_signal(signal.SIGTERM)
        assert suite.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers)
    finally:
        suite.kill()
        suite.wait()
