"""What a newcomer sees of the demos: --help, defaults, the thread count, printed tables and plots."""

import argparse
import importlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEMOS = ("deq_cifar10", "stable_anderson", "cpu_vs_gpu", "deq_report", "deq_solvers", "deq_compaction", "deq_jacobian")


def help_paragraphs(text):
    """{first option string or positional name: its help text} from argparse's --help output."""
    paragraphs, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            current = m.group(1).split()[0].rstrip(",")
            paragraphs[current] = m.group(2) or ""
        elif current and line.startswith("    ") and line.strip():
            paragraphs[current] += " " + line.strip()
        else:
            current = None
    return paragraphs


@pytest.mark.parametrize("name", DEMOS)
def test_help_documents_every_option_and_says_each_default_once(name, capsys):
    demo = importlib.import_module(f"demos.{name}")
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    paragraphs = help_paragraphs(text)
    for action in demo.make_parser()._actions:
        key = action.option_strings[0] if action.option_strings else action.metavar or action.dest
        assert key in paragraphs, f"{name}: {key} missing from --help"
        words = paragraphs[key]
        assert words.strip(), f"{name}: {key} has no help text"
        assert words.count("(default") <= 1, f"{name}: {key}: {words}"
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and key != "-h":
            assert "default" in words, f"{name}: {key} does not say its default ({action.default!r})"


def test_output_folders_default_under_out():
    for name in ("deq_cifar10", "stable_anderson", "cpu_vs_gpu"):
        default = importlib.import_module(f"demos.{name}").make_parser().get_default("out")
        assert Path(default).parts[0] == "out", name


def test_cpu_vs_gpu_default_sizes_stop_at_max_n(capsys):
    from demos import cpu_vs_gpu

    def sizes(*argv):
        parser = cpu_vs_gpu.make_parser()
        args = parser.parse_args(["--problems", "jacobi", *argv])
        cpu_vs_gpu._check_args(args, parser)
        return args.sizes

    assert sizes() == [10**3, 10**4, 10**5, 10**6]
    assert sizes("--max-n", "1e7")[-1] == 10**7
    capsys.readouterr()
    assert sizes("--sizes", "1e3", "1e7") == [1000]  # an explicit size above --max-n is left out, and said so
    assert "1e+07 left out" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sizes("--sizes", "1e7")
    assert "--max-n" in capsys.readouterr().err
    for bad in (["--trace", "conv"], ["--trace", "nope:1e3"], ["--backends", "fortran"]):
        with pytest.raises(SystemExit):
            sizes(*bad)
        assert bad[0] in capsys.readouterr().err


def test_cpu_vs_gpu_every_panel_has_x_tick_labels():
    from demos import cpu_vs_gpu

    rows = [dict(problem=p, n=n, backend="numpy", method=m, time=1e-3 * (1 + k))
            for p, ns in (("h-equation", (250, 500)), ("jacobi", (1000, 4000)), ("conv", (4096, 8192, 65536)))
            for n in ns for k, m in enumerate(("forward", "anderson"))]
    fig = cpu_vs_gpu.plot_time_vs_n(rows)
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        shown = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
                 if t.get_text() and lo <= t.get_position()[0] <= hi]
        assert len(shown) >= 2, (ax.get_title(), shown)
    assert cpu_vs_gpu.n_label(250) == "250" and cpu_vs_gpu.n_label(768) == "768"


def _run(name, times, fev):
    epochs = [dict(epoch=i + 1, time_cumulative=t, cpu_cumulative=t, test_acc=0.5 + 0.1 * i, train_acc=0.4 + 0.1 * i)
              for i, t in enumerate(times)]
    batches = [dict(step=i + 1, fwd_fev=f, bwd_fev=f + 3, fwd_iter_mean=f - 2.5, bwd_iter_mean=f)
               for i, f in enumerate(fev)]
    return SimpleNamespace(solver=name, epochs=epochs, batches=batches)


def test_deq_plots_use_a_log_time_axis_and_plain_tick_labels(tmp_path):
    from demos import deq_plots

    summary = dict(settings=dict(dataset="digits", device="cpu", solver_backend="numpy"))
    slow = {"forward": _run("forward", [40.0, 90.0, 160.0], [20]), "anderson": _run("anderson", [1.0, 2.0, 3.0], [9])}
    close = {"forward": _run("forward", [4.0, 9.0, 16.0], [20]), "anderson": _run("anderson", [2.0, 4.0, 6.0], [9])}
    for runs, name, scale in ((slow, "a.png", "log"), (close, "b.png", "linear")):
        points = {k: r.epochs for k, r in runs.items()}
        assert deq_plots.plot_accuracy(tmp_path / name, runs, summary, points).axes[0].get_xscale() == scale
    runs = {"forward": _run("forward", [1.0], [14, 22, 31, 38, 25]), "anderson": _run("anderson", [1.0], [12, 17, 20])}
    fig = deq_plots.plot_iterations(tmp_path / "c.png", runs, summary)
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        shown = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)
                 if t.get_text() and lo <= t.get_position()[1] <= hi]
        assert shown and all(re.fullmatch(r"\d+", s) for s in shown), shown  # 20, 30, not 2×10¹ or 3×10¹


def test_deq_accuracy_plot_falls_back_to_wall_time_for_runs_recorded_without_cpu_time(tmp_path):
    from demos import deq_plots
    from demos.deq_report import evaluation_points

    summary = dict(settings=dict(dataset="digits", device="cpu", solver_backend="numpy"))
    runs = {"forward": _run("forward", [4.0, 9.0], [20]), "anderson": _run("anderson", [2.0, 4.0], [9])}
    for run in runs.values():  # as the runs made before the demo measured CPU time
        for e in run.epochs:
            del e["cpu_cumulative"]
    fig = deq_plots.plot_accuracy(tmp_path / "old.png", runs, summary,
                                  {k: evaluation_points(r) for k, r in runs.items()})
    assert fig.axes[0].get_xlabel() == "training wall time [s]"


def test_time_to_accuracy_is_read_from_the_first_evaluation_that_reaches_it():
    from demos.deq_report import evaluation_points, time_to_accuracy
    from demos.deq_training import evaluation_points as points_of_epoch

    assert points_of_epoch(100, 4) == (25, 50, 75, 100) and points_of_epoch(10, 3) == (4, 7, 10)
    assert points_of_epoch(3, 4) == (1, 2, 3) and points_of_epoch(10, 1) == (10,)
    evals = [dict(epoch=1, epoch_progress=0.25 * (k + 1), time_cumulative=10.0 * (k + 1), cpu_cumulative=8.0 * (k + 1),
                  test_acc=acc) for k, acc in enumerate((0.5, 0.7, 0.65, 0.8))]
    run = SimpleNamespace(solver="anderson", epochs=[dict(epoch=1, time_cumulative=40.0, cpu_cumulative=32.0,
                                                         test_acc=0.8)], evaluations=evals)
    assert time_to_accuracy(run, 0.7) == dict(time=20.0, cpu=16.0, epochs=0.5)  # the first at or above, not the last
    assert time_to_accuracy(run, 0.75) == dict(time=40.0, cpu=32.0, epochs=1.0)
    assert time_to_accuracy(run, 0.9) is None
    old = SimpleNamespace(solver="forward", epochs=run.epochs, evaluations=[])  # a run made before the points
    assert evaluation_points(old)[0]["epoch_progress"] == 1.0 and time_to_accuracy(old, 0.7)["cpu"] == 32.0


def test_deq_demo_chooses_and_prints_its_thread_count(tmp_path, monkeypatch, capsys):
    import torch

    from demos import deq_cifar10
    from tooling import timing

    monkeypatch.setattr(timing, "default_threads", lambda: (1, "pretend: 1 idle CPU"))
    torch.set_num_threads(2)
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert deq_cifar10.main(["--dataset", "digits", "--out", str(a_file)]) == 2  # refused after the settings
    assert "torch threads: 1 (pretend: 1 idle CPU" in capsys.readouterr().out
    assert torch.get_num_threads() == 1


def test_deq_report_errors_are_one_line(tmp_path, capsys):
    from demos import deq_report

    assert deq_report.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    assert deq_report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err
