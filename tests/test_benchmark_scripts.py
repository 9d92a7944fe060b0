"""The command lines of benchmarks/ scripts that other test files do not cover: gpu_session.sh,
host_cost.py, sm90.py, sweep_forward_tiles.py and ablate_stage1.py. Bad arguments are refused
before any work, which is stubbed here to fail."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.scripts import BENCHMARKS, load_benchmark

SESSION = BENCHMARKS / "gpu_session.sh"


def _no_work(*args, **kwargs):
    raise AssertionError("the arguments should have been refused before any work")


@pytest.fixture
def stubbed_session(tmp_path):
    """A copy of gpu_session.sh whose commands (install, python3, nvidia-smi, timeout, tar,
    pgrep) only log their calls: (run(mode) -> CompletedProcess, the log)."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SESSION, tmp_path / "benchmarks")
    log = tmp_path / "calls.log"
    (tmp_path / "benchmarks" / "gpu_setup.sh").write_text('echo install >> "$LOG"\n')
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for command in ("python3", "nvidia-smi", "timeout", "tar", "pgrep"):
        (stubs / command).write_text(f'#!/bin/sh\necho "{command} $*" >> "$LOG"\n')
        (stubs / command).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "LOG": str(log), "OUT": str(tmp_path / "out"),
           "DDS_SESSION_WORK": str(tmp_path / "work")}

    def run(*mode):
        return subprocess.run(["bash", "benchmarks/gpu_session.sh", *mode], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    return run, log


def test_gpu_session_refuses_an_unknown_mode_before_installing(stubbed_session, tmp_path):
    run, log = stubbed_session
    done = run("qiuck")
    assert done.returncode == 2
    assert "unknown mode 'qiuck'" in done.stderr and "quick" in done.stderr
    assert not log.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", [(), ("full",), ("quick",), ("train",), ("verify",), ("model",), ("tests",), ("next",)])
def test_gpu_session_runs_each_known_mode(stubbed_session, mode):
    run, log = stubbed_session
    done = run(*mode)
    assert done.returncode == 0, done.stderr
    assert log.read_text().startswith("install\n")


def test_every_step_packs_the_results_before_it_into_the_one_file_out_brings_back(stubbed_session, tmp_path):
    """$OUT brings back 8 files at most, and a call stopped at its limit packs nothing more: the
    archive is rebuilt as each step begins, and is all $OUT holds."""
    import tarfile

    run, log = stubbed_session
    (tmp_path / "stubs" / "tar").unlink()  # the real one
    done = run("next")
    assert done.returncode == 0, done.stderr
    steps = done.stdout.count("\n== ")
    assert steps >= 5 and done.stdout.count("packed") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.tgz"]
    with tarfile.open(tmp_path / "out" / "results.tgz") as archive:
        names = archive.getnames()
    assert "results/device.txt" in names and "results/tests.txt" in names and "results/bench.txt" in names


def test_quiet_gpu_kills_this_sessions_test_processes_only(tmp_path):
    """quiet_gpu's pattern matches pytest-xdist workers (``exec(eval(sys.stdin...`` is not a
    valid regex unescaped) and pytest runs, of its own session only: another session's pytest
    (another user's, or this test's runner) is left alone. ``kill`` is stubbed to print."""
    text = SESSION.read_text()
    start = text.index("quiet_gpu() {")
    function = text[start:text.index("\n}\n", start) + 3]
    sleeper = f'"{sys.executable}" -c "import time; time.sleep(60)"'
    script = tmp_path / "quiet.sh"  # a file: a `bash -c` command line would hold the patterns itself
    # (their output elsewhere: the pipe read below ends when every writer has)
    script.write_text(f"""{sleeper} "import sys;exec(eval(sys.stdin.readline()))" > /dev/null & worker=$!
{sleeper} -m pytest > /dev/null & runner=$!
# until both have exec'd python (their command lines are bash's before)
until [ "$(pgrep -s 0 -fc 'time\\.sleep\\(60\\)')" -ge 2 ]; do sleep 0.05; done
kill() {{ echo "kill $*"; }}
sleep() {{ :; }}
{function}
quiet_gpu
echo "worker $worker runner $runner"
""")
    outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "pytest"])
    # started by a shell whose own command line names "-m pytest": quiet_gpu's ancestors are spared
    session = subprocess.Popen(["bash", "-c", f'bash {script}; true "-m pytest"'], start_new_session=True,
                               stdout=subprocess.PIPE, text=True)
    try:
        out, _ = session.communicate(timeout=30)
    finally:
        outside.kill()
        try:
            os.killpg(session.pid, signal.SIGKILL)  # the sleepers
        except ProcessLookupError:
            pass
    expected = out.split("worker ")[1].split()[::2]  # the worker's and the runner's pids
    killed = next(line for line in out.splitlines() if line.startswith("kill ")).split()[2:]
    assert sorted(killed) == sorted(expected), out
    assert str(outside.pid) not in killed


@pytest.mark.parametrize("script, default", [("host_cost", "host-cost.json"), ("sm90", "sm90-forward.json"),
                                             ("sweep_forward_tiles", "sweep-forward-tiles.json")])
def test_gpu_scripts_parse_their_arguments(monkeypatch, tmp_path, capsys, script, default):
    """--help prints the usage (it ran the benchmark into a file named --help); no argument
    writes the default file, as gpu_session.sh and the README run them."""
    module = load_benchmark(monkeypatch, script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, "run", _no_work)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    calls = []
    monkeypatch.setattr(module, "run", lambda *args: calls.append(args))
    module.main([])
    assert calls[0][0] == default
    with pytest.raises(SystemExit) as exit_:
        module.main(["a.json", "--bogus"])
    assert exit_.value.code == 2


def test_sweep_refuses_unknown_cases(monkeypatch, capsys):
    sweep = load_benchmark(monkeypatch, "sweep_forward_tiles")
    calls = []
    monkeypatch.setattr(sweep, "run", lambda *args: calls.append(args))
    sweep.main(["out.json", "stem", "eight", "narrow", "mid"])  # gpu_session.sh verify's cases
    sweep.main(["out.json", "grad-weight"])
    assert calls == [("out.json", {"stem", "eight", "narrow", "mid"}), ("out.json", {"grad-weight"})]
    if not sweep.CUDA:  # the interpreter's tiny cases have no mid: said, not silently skipped
        assert "no CPU case for mid" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["out.json", "stem", "narow"])
    assert exit_.value.code == 2 and "unknown cases ['narow']" in capsys.readouterr().err
    assert len(calls) == 2


@pytest.mark.parametrize("argv, message", [(["--out", "no-such-folder/r.json"], "--out"),
                                           (["--steps", "0"], "--steps")])
def test_ablate_stage1_refuses_bad_arguments_before_training(monkeypatch, tmp_path, capsys, argv, message):
    ablate = load_benchmark(monkeypatch, "ablate_stage1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ablate, "Run", _no_work)
    with pytest.raises(SystemExit) as exit_:
        ablate.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "checkpoint_every" not in err


def test_profile_reports_are_written_as_each_is_made(monkeypatch, tmp_path, capsys):
    """gpu_session.sh stops a profiler at its time limit: the reports made by then stay."""
    timing = load_benchmark(monkeypatch, "_timing")
    out, reports = tmp_path / "profile.txt", []
    timing.add_report(str(out), reports, "first")
    assert out.read_text() == "first" and capsys.readouterr().out == "first\n\n"
    timing.add_report(str(out), reports, "second")
    assert out.read_text() == "first\n\nsecond" and reports == ["first", "second"]
