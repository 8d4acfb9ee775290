"""The progress display: a live line on a terminal, plain log lines otherwise."""

import io

from prunelab.experiments.progress import Progress


def outcome(status="done", accuracy=0.9):
    if status == "done":
        return {"status": "done", "metrics": {"accuracy": accuracy}, "seconds": 1.5}
    return {"status": "failed", "error": "TrainingDiverged: loss became nan\\ntraceback", "seconds": 0.2}


def test_plain_mode_prints_one_line_per_finished_run():
    stream = io.StringIO()
    progress = Progress(4, done=1, stream=stream, live=False)
    progress.start("a", "digits/mlp/mag s=0.5 #0")
    assert stream.getvalue() == ""  # nothing per start in log mode
    progress.finish("a", "digits/mlp/mag s=0.5 #0", outcome())
    progress.start("b", "digits/mlp/mag s=0.9 #0")
    progress.finish("b", "digits/mlp/mag s=0.9 #0", outcome("failed"))
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[2/4] digits/mlp/mag s=0.5 #0 1.5s accuracy 0.9000 (2 done, 0 failed, 2 left, ETA")
    assert lines[1].startswith("[3/4] digits/mlp/mag s=0.9 #0 0.2s FAILED: TrainingDiverged: loss became nan")
    assert "(2 done, 1 failed, 1 left" in lines[1]
    assert lines[2].startswith("2/4 done, 1 failed, 1 not run; 2 finished in this session")
    assert "\r" not in stream.getvalue()


def test_live_mode_redraws_one_line_with_the_runs_in_flight():
    stream = io.StringIO()
    progress = Progress(3, stream=stream, live=True)
    progress.start("a", "run-A")
    progress.start("b", "run-B")
    text = stream.getvalue()
    assert "\r\033[K" in text and "0/3 done, 0 failed, 3 left, ETA ?" in text
    assert "running: run-A, run-B" in text.rsplit("\r", 1)[-1]
    progress.finish("a", "run-A", outcome())
    last = stream.getvalue().rsplit("\r\033[K", 1)[-1]
    assert last.startswith("[######..............] 1/3 done") and "running: run-B" in last
    progress.finish("b", "run-B", outcome("failed"))
    assert "FAILED: TrainingDiverged" in stream.getvalue()  # failures are printed above the line
