"""The DEQ demo (demos/deq_cifar10.py) as a user meets it: interruptions, resumes, earlier runs, bad files.

Runs are tiny (digits, a few hundred images, batches of 50, an iteration cap of 30) and on one torch
thread, so that each test takes seconds and the runs are bit-for-bit reproducible.
"""

import csv
import json
import os
import signal

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from demos import deq_cifar10, deq_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORD_KEYS = ("solver", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "fwd_fev_mean",
               "bwd_fev_mean", "test_fwd_fev_mean")
BATCH_KEYS = ("solver", "epoch", "batch", "step", "size", "loss", "correct", "fwd_fev", "bwd_fev")


def tiny(out, *extra, solver="both", epochs=2, train=200):
    return ["--dataset", "digits", "--solver", solver, "--epochs", str(epochs), "--limit-train", str(train),
            "--limit-test", "100", "--batch-size", "50", "--max-iter", "30", "--fig-iters", "3", "--threads", "1",
            "--no-progress", "--out", str(out), *extra]


def epoch_records(out):
    return [{k: r[k] for k in RECORD_KEYS} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def batch_records(out):
    with open(out / "batches.csv", newline="") as fh:
        return [{k: row[k] for k in BATCH_KEYS} for row in csv.DictReader(fh)]


EVALUATION_KEYS = ("solver", "epoch", "batch", "step", "epoch_progress", "test_loss", "test_acc")


def evaluation_records(out):
    with open(out / "evaluations.csv", newline="") as fh:
        return [{k: row[k] for k in EVALUATION_KEYS} for row in csv.DictReader(fh)]


def model_state(out, solver):
    return torch.load(out / f"checkpoint-{solver}.pt", weights_only=False)["model"]


@pytest.fixture
def fail_on_sigterm():
    """A SIGTERM that the demo does not handle fails the test instead of killing pytest."""

    def unhandled(signum, frame):
        pytest.fail("SIGTERM reached the test's handler: the demo does not handle it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


class Interrupter:
    """Sends a real signal to this process at a chosen evaluation of the DEQ's map f.

    ``arm(signum, at, mode)`` makes the ``at``-th call of f (counted from the arming) in ``mode``
    ("train": during a training batch, "eval": during evaluation) send ``signum``; the
    optimizer's step can be chosen too (``mode="step"``), where the signal must be held back
    until the batch is complete.
    """

    def __init__(self, monkeypatch):
        self.plan, self.counts, self.sent = None, {}, []
        real_cell, real_step = deq_model.ResidualCell.forward, torch.optim.Adam.step
        interrupter = self

        def cell(module, z, x):
            interrupter.tick("train" if module.training else "eval")
            return real_cell(module, z, x)

        def step(optimizer, *a, **k):
            interrupter.tick("step")
            return real_step(optimizer, *a, **k)

        monkeypatch.setattr(deq_model.ResidualCell, "forward", cell)
        monkeypatch.setattr(torch.optim.Adam, "step", step)

    def arm(self, signum, at, mode):
        self.plan, self.counts = (signum, at, mode), {}

    def tick(self, mode):
        if self.plan is None:
            return
        self.counts[mode] = self.counts.get(mode, 0) + 1
        signum, at, want = self.plan
        if mode == want and self.counts[mode] == at:
            self.plan = None
            self.sent.append((signal.Signals(signum).name, mode))
            os.kill(os.getpid(), signum)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path, monkeypatch, capsys,
                                                                               fail_on_sigterm):
    fresh = tmp_path / "fresh"
    assert deq_cifar10.main(tiny(fresh)) == 0
    stopped = tmp_path / "stopped"
    interrupter = Interrupter(monkeypatch)
    plan = [(signal.SIGTERM, 2, "train"),    # during the first forward solve of the first batch
            (signal.SIGINT, 57, "train"),    # in a later batch (the first of epoch 2)
            (signal.SIGINT, 3, "step"),      # inside an optimizer step: held back until the batch is done
            (signal.SIGTERM, 9, "eval"),     # during the evaluation after an epoch
            (signal.SIGINT, 60, "train"),    # in the middle of the Anderson run
            (signal.SIGINT, 5, "eval")]      # during its evaluation
    codes = []
    for k, (signum, at, mode) in enumerate(plan):
        interrupter.arm(signum, at, mode)
        codes.append(deq_cifar10.main(tiny(stopped, *(["--resume"] if k else []))))
        err = capsys.readouterr().err
        if codes[-1] != 0:  # one line on stderr, naming the signal and --resume
            assert len(err.strip().splitlines()) == 1 and "--resume" in err, err
            assert ("SIGTERM" if codes[-1] == 128 + signal.SIGTERM else "SIGINT") in err
    interrupter.plan = None
    while codes[-1] != 0 and len(codes) < 12:
        codes.append(deq_cifar10.main(tiny(stopped, "--resume")))
    assert codes[-1] == 0
    assert len(interrupter.sent) >= 5 and {m for _, m in interrupter.sent} >= {"train", "step", "eval"}
    assert codes[0] == 128 + signal.SIGTERM and 130 in codes
    assert epoch_records(stopped) == epoch_records(fresh)
    assert batch_records(stopped) == batch_records(fresh)
    # four test evaluations per epoch (after each of the 4 batches), each made once, the same as uninterrupted
    assert evaluation_records(stopped) == evaluation_records(fresh)
    assert [(r["solver"], r["epoch"], r["batch"]) for r in evaluation_records(fresh)] == [
        (s, str(e), str(b)) for s in ("forward", "anderson") for e in (1, 2) for b in (1, 2, 3, 4)]
    for solver in ("forward", "anderson"):
        a, b = model_state(stopped, solver), model_state(fresh, solver)
        assert a.keys() == b.keys()
        for key in a:  # weights and every buffer, BatchNorm's running statistics and batch counts included
            assert torch.equal(a[key], b[key]), (solver, key)
        assert int(a["bn_in.num_batches_tracked"]) == 8  # 2 epochs of 4 batches, none counted twice


def folder_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert deq_cifar10.main(tiny(out, epochs=1, train=100)) == 0
    before = folder_bytes(out)
    assert {"checkpoint-forward.pt", "checkpoint-anderson.pt", "batches.csv", "metrics.jsonl"} <= set(before)
    capsys.readouterr()
    for solver in ("both", "anderson"):  # the same command again, or another solver into the same folder
        assert deq_cifar10.main(tiny(out, epochs=1, train=100, solver=solver)) == 2
        err = one_error_line(capsys)
        assert "--resume" in err and "--overwrite" in err and str(out) in err
        assert folder_bytes(out) == before  # nothing deleted, truncated or rewritten
    # --overwrite replaces it: the other solver's checkpoint goes too, so it cannot be resumed by mistake
    assert deq_cifar10.main(tiny(out, "--overwrite", epochs=1, train=100, solver="anderson")) == 0
    assert not (out / "checkpoint-forward.pt").exists()
    assert {r["solver"] for r in epoch_records(out)} == {"anderson"}
    with pytest.raises(SystemExit):  # the two cannot be combined
        deq_cifar10.main(tiny(out, "--overwrite", "--resume"))
    assert "--overwrite" in capsys.readouterr().err


def test_resuming_one_solver_keeps_every_solvers_records(tmp_path, capsys):
    out = tmp_path / "run"
    assert deq_cifar10.main(tiny(out, epochs=1, train=100)) == 0
    epochs, batches = epoch_records(out), batch_records(out)
    totals = json.loads((out / "summary.json").read_text())["totals"]
    assert deq_cifar10.main(tiny(out, "--resume", epochs=1, train=100, solver="anderson")) == 0
    assert epoch_records(out) == epochs and batch_records(out) == batches
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"].keys() == totals.keys() == {"forward", "anderson"}
    assert summary["totals"]["forward"]["fwd_fev"] == totals["forward"]["fwd_fev"]
    assert summary["comparison"] is not None


def test_out_that_is_a_file_or_unusable_checkpoints_are_one_line_errors(tmp_path, capsys):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("mine")
    assert deq_cifar10.main(tiny(a_file, epochs=1, train=100)) == 2
    assert str(a_file) in one_error_line(capsys) and a_file.read_text() == "mine"

    out = tmp_path / "run"
    assert deq_cifar10.main(tiny(out, epochs=1, train=100, solver="anderson")) == 0
    good = (out / "checkpoint-anderson.pt").read_bytes()
    capsys.readouterr()
    # a different setting
    assert deq_cifar10.main(tiny(out, "--resume", "--lr", "0.01", epochs=1, train=100, solver="anderson")) == 2
    err = one_error_line(capsys)
    assert "checkpoint-anderson.pt" in err and "lr" in err
    # garbage, a truncated file, and a checkpoint of the other solver under this solver's name
    for name, content in (("garbage", b"not a checkpoint at all"), ("truncated", good[: len(good) // 2])):
        (out / "checkpoint-anderson.pt").write_bytes(content)
        assert deq_cifar10.main(tiny(out, "--resume", epochs=1, train=100, solver="anderson")) == 2, name
        assert "checkpoint-anderson.pt" in one_error_line(capsys), name
    (out / "checkpoint-anderson.pt").write_bytes(good)
    (out / "checkpoint-forward.pt").write_bytes(good)
    assert deq_cifar10.main(tiny(out, "--resume", epochs=1, train=100, solver="forward")) == 2
    err = one_error_line(capsys)
    assert "checkpoint-forward.pt" in err and "anderson" in err
    # records of a solver whose checkpoint is gone would be dropped: refused
    (out / "checkpoint-forward.pt").unlink()
    (out / "checkpoint-anderson.pt").unlink()
    assert deq_cifar10.main(tiny(out, "--resume", epochs=1, train=100, solver="forward")) == 2
    assert "checkpoint-anderson.pt" in one_error_line(capsys)
    assert {r["solver"] for r in epoch_records(out)} == {"anderson"}


def test_every_solver_side_by_side_with_compaction(tmp_path, capsys):
    out = tmp_path / "three"
    assert deq_cifar10.main(tiny(out, "--compact", "on", "--solver", "forward", "anderson", "broyden", epochs=1,
                                 train=100)) == 0
    printed = capsys.readouterr().out
    assert "anderson vs forward iteration" in printed and "broyden vs forward iteration" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["totals"]) == {"forward", "anderson", "broyden"}
    assert set(summary["comparison"]) == {"anderson", "broyden"}
    assert summary["settings"]["compact"] == "on"
    with open(out / "batches.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["solver"] for r in rows} == {"forward", "anderson", "broyden"}
    for r in rows:  # rows of f: at most the whole batch per evaluation, at least one per sample and evaluation
        size, fev, f_rows = int(r["size"]), int(r["fwd_fev"]), int(r["fwd_rows"])
        assert fev <= f_rows <= size * fev
        assert f_rows == round(float(r["fwd_iter_mean"]) * size)  # compaction from the first check on
    assert any(int(r["fwd_rows"]) < int(r["size"]) * int(r["fwd_fev"]) for r in rows)
    # the same-model solves: every final model by every solver, the figures of deq_solvers.py on its checkpoint
    assert "same model" in printed and set(summary["same_model"]) == {"forward", "anderson", "broyden"}
    from demos import deq_solvers

    same = summary["same_model"]["anderson"]
    again = deq_solvers.solvers_on_model(str(out / "checkpoint-anderson.pt"), deq_solvers.SOLVERS, 5)
    for solver in deq_solvers.SOLVERS:
        for key in ("samples", "rows", "iterations_mean", "iterations_max", "converged"):
            assert same["measurements"][solver][key] == again["measurements"][solver][key], (solver, key)
    ratio = same["ratios"]["anderson"]
    m = same["measurements"]
    assert ratio["rows_ratio"] == pytest.approx(m["anderson"]["rows"] / m["forward"]["rows"])
    assert ratio["cpu_over_rows"] == pytest.approx(ratio["cpu_ratio"] / ratio["rows_ratio"])
    # time to accuracy is read from the test evaluations, whose cost is not training time
    with open(out / "evaluations.csv", newline="") as fh:
        points = list(csv.DictReader(fh))
    assert len(points) == 3 * 2  # 2 batches per epoch: an evaluation after each
    for solver in ("forward", "anderson", "broyden"):
        mine = [r for r in rows if r["solver"] == solver]
        end = [p for p in points if p["solver"] == solver][-1]
        assert float(end["cpu_cumulative"]) == pytest.approx(sum(float(r["cpu_total"]) for r in mine))
        assert float(end["time_cumulative"]) == pytest.approx(summary["totals"][solver]["time_train"])
    c = summary["comparison"]["anderson"]
    assert c["time_vs_iteration_saving"] == pytest.approx(c["time_per_epoch_saved"] / c["per_sample_saved_total"])
    totals = summary["totals"]
    assert c["rows_saved_total"] == pytest.approx(1 - (totals["anderson"]["fwd_rows"] + totals["anderson"]["bwd_rows"])
                                                  / (totals["forward"]["fwd_rows"] + totals["forward"]["bwd_rows"]))


@pytest.mark.parametrize("extra", [["--gradient", "phantom", "--gradient-steps", "3", "--gradient-damping", "0.7"],
                                   ["--gradient", "jfb"], ["--jac-reg", "0.5", "--jac-probes", "2"]])
def test_gradient_modes_and_jacobian_regularisation(tmp_path, extra):
    out = tmp_path / "run"
    assert deq_cifar10.main(tiny(out, *extra, solver="anderson", epochs=1, train=100)) == 0
    with open(out / "batches.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["gradient"] == extra[1] if extra[0] == "--gradient" else settings["jac_reg"] == 0.5
    for r in rows:
        assert r["time_backward_layer"] != "nan"  # the layer's backward pass was observed from end to end
        if "phantom" in extra:  # k - 1 products besides the last, no solve
            assert int(r["bwd_fev"]) == 2 and float(r["time_backward_solve"]) == 0.0
            assert int(r["graph_rows"]) == 3 * int(r["size"])
        elif "jfb" in extra:
            assert int(r["bwd_fev"]) == 0 and r["bwd_converged"] == "nan"
        else:
            assert float(r["jac_frobenius"]) > 0 and float(r["bwd_converged"]) == 1.0
    assert deq_cifar10.main(tiny(out, *extra, "--resume", solver="anderson", epochs=1, train=100)) == 0


@pytest.mark.parametrize("flags, word", [(["--gradient", "phantom", "--gradient-damping", "0"], "--gradient-damping"),
                                         (["--gradient", "phantom", "--gradient-damping", "1.5"],
                                          "--gradient-damping"),
                                         (["--gradient-steps", "0"], "--gradient-steps"),
                                         (["--gradient", "newton"], "--gradient"),
                                         (["--compact", "yes"], "--compact"),
                                         (["--compact", "on", "--whole-batch"], "--compact"),
                                         (["--jac-reg", "-1"], "--jac-reg"),
                                         (["--solver", "newton"], "--solver")])
def test_bad_new_flags_are_refused(tmp_path, capsys, flags, word):
    with pytest.raises(SystemExit) as exc:
        deq_cifar10.main(tiny(tmp_path / "x", *flags))
    assert exc.value.code == 2 and word in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compaction_measurement_counts_rows_per_setting(tmp_path, capsys):
    from demos import deq_compaction

    out = tmp_path / "run"
    assert deq_cifar10.main(tiny(out, solver="forward", epochs=1, train=100)) == 0
    report = tmp_path / "compaction.json"
    assert deq_compaction.main([str(out / "checkpoint-forward.pt"), "--batches", "1", "--threads", "1",
                                "--settings", "off", "on/0", "on/1", "--out", str(report)]) == 0
    rows = {r["setting"]: r for r in json.loads(report.read_text())["measurements"]}
    off, never, always = rows["off"], rows["on/0"], rows["on/1"]
    size = 50
    assert off["fwd_rows"] == size * off["fwd_fev"] and off["bwd_rows"] == size * off["bwd_fev"]
    # the same solves (same evaluations), fewer rows with compaction
    assert never["fwd_fev"] == off["fwd_fev"] and never["fwd_rows"] < off["fwd_rows"]
    assert never["bwd_rebuilt_rows"] == 0 and never["bwd_rows"] == off["bwd_rows"]  # products on the full graph
    assert always["bwd_rebuilt_rows"] > 0 and always["bwd_rows"] < never["bwd_rows"]
    assert "totals over the batches" in capsys.readouterr().out


def test_jacobian_of_the_trained_models(tmp_path):
    from demos import deq_jacobian

    out = tmp_path / "run"
    assert deq_cifar10.main(tiny(out, solver="anderson", epochs=1, train=100)) == 0
    first = deq_jacobian.jacobian_on_test_set(out / "checkpoint-anderson.pt", probes=2, seed=3)
    again = deq_jacobian.jacobian_on_test_set(out / "checkpoint-anderson.pt", probes=2, seed=3)
    assert first == again and first[0] > 0 and first[1] >= 1  # the same probes for the same seed


def test_every_solver_on_the_same_model(tmp_path, capsys):
    from demos import deq_solvers

    out = tmp_path / "run"
    assert deq_cifar10.main(tiny(out, solver="forward", epochs=1, train=100)) == 0
    report = tmp_path / "solvers.json"
    assert deq_solvers.main([str(out / "checkpoint-forward.pt"), "--batches", "1", "--threads", "1",
                             "--out", str(report)]) == 0
    (res,) = json.loads(report.read_text())["results"]
    got = res["measurements"]
    assert res["trained_with"] == "forward" and set(got) == set(deq_solvers.SOLVERS)
    for r in got.values():  # with compaction, f sees each sample once per iteration (and no more than twice)
        total = r["iterations_mean"] * r["samples"]
        assert r["samples"] == 50 and total - 0.5 <= r["rows"] <= 2 * total
        assert r["iterations_max"] >= r["iterations_median"] >= 1 and 0.0 <= r["converged"] <= 1.0
    assert got["anderson"]["rows"] != got["forward"]["rows"]  # the solvers really differ
    assert "trained with forward" in capsys.readouterr().out
