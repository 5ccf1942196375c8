"""The DEQ demo's data loaders (CIFAR-10 pickles, IDX files, digits), batches, and one short end-to-end run."""

import gzip
import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from demos import data  # noqa: E402
from demos.batches import Batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- CIFAR-10

def _write_cifar_fixture(folder, n_per_batch=4, seed=0):
    """A miniature cifar-10-batches-py in the exact format: protocol-2 pickles with bytes keys."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    images = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        arr = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        batch = {b"batch_label": f"batch {k}".encode(), b"labels": labels, b"data": arr,
                 b"filenames": [f"img{k}_{i}.png".encode() for i in range(n_per_batch)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        images[name] = (arr, labels)
    meta = {b"num_cases_per_batch": n_per_batch, b"num_vis": 3072,
            b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck")]}
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return images


def test_cifar10_loader_reads_the_pickled_batches(tmp_path):
    raw = _write_cifar_fixture(tmp_path / "cifar-10-batches-py")
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):  # torchvision's root, or the folder itself
        d = data.load_cifar10(where, download=False)
        assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
        assert d.train_x.dtype == np.uint8 and d.train_y.dtype == np.int64 and d.max_value == 255
        assert d.classes[0] == "airplane" and d.classes[9] == "truck" and len(d.classes) == 10
        arr, labels = raw["data_batch_2"]
        img = d.train_x[4]  # first image of data_batch_2
        # the 3072 bytes are the R, G and B planes of 32x32, row by row
        assert img[0, 0, 0] == arr[0, 0] and img[0, 0, 1] == arr[0, 1] and img[0, 1, 0] == arr[0, 32]
        assert img[1, 0, 0] == arr[0, 1024] and img[2, 31, 31] == arr[0, 3071]
        assert d.train_y[4:8].tolist() == labels
        assert d.test_y.tolist() == raw["test_batch"][1]


def test_cifar10_missing_or_incomplete_or_unsafe(tmp_path):
    with pytest.raises(data.DataError, match=r"cifar-10-batches-py.*cifar-10-python\.tar\.gz"):
        data.load_cifar10(tmp_path / "nowhere", download=False)
    folder = tmp_path / "c" / "cifar-10-batches-py"
    _write_cifar_fixture(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.load_cifar10(tmp_path / "c", download=False)
    with open(folder / "data_batch_3", "wb") as fh:  # a pickle that would run code
        pickle.dump({b"data": os.system}, fh, protocol=2)
    with pytest.raises(data.DataError, match="refusing"):
        data.load_cifar10(tmp_path / "c", download=False)


# ---------------------------------------------------------------- IDX

def _idx_bytes(arr, code):
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_idx_reader_plain_and_gzip(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(imgs, 0x08))
    (tmp_path / "b-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(imgs, 0x08)))
    vals = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    (tmp_path / "c-idx1").write_bytes(_idx_bytes(vals, 0x0D))
    ints = np.array([[70000, -5]], dtype=np.int32)
    (tmp_path / "d-idx2").write_bytes(_idx_bytes(ints, 0x0C))
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        got = data.read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "c-idx1"), vals)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "d-idx2"), ints)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(imgs, 0x08)[:-1])
    with pytest.raises(data.DataError, match="bytes"):
        data.read_idx(tmp_path / "short")


def test_fashion_mnist_loader_on_a_fixture(tmp_path):
    rng = np.random.default_rng(1)
    tr = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    te = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(tr, 0x08)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(6, dtype=np.uint8), 0x08))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(te, 0x08))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.arange(3, dtype=np.uint8),
                                                                                    0x08)))
    d = data.load_fashion_mnist(tmp_path)
    assert d.train_x.shape == (6, 1, 28, 28) and d.test_x.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(d.train_x[:, 0], tr)
    assert d.train_y.tolist() == list(range(6)) and d.classes[9] == "Ankle boot"
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path / "missing")


def _fashion_fixture(folder, n_train=6, n_test=3, labels=None):
    """The four Fashion-MNIST IDX files in ``folder``; returns their paths by stem."""
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10 if labels is None else labels,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10}
    paths = {}
    for stem, arr in arrays.items():
        paths[stem] = folder / stem
        paths[stem].write_bytes(_idx_bytes(arr, 0x08 if arr.dtype == np.uint8 else 0x0D))
    return paths


def _corruptions(good):
    """(name, bytes) of broken IDX files made from a good uncompressed one."""
    gz = gzip.compress(good)
    bad_crc = bytearray(gz)
    bad_crc[-8] ^= 0xFF  # the CRC-32 of the gzip trailer
    huge = bytes([0, 0, 0x08, 3]) + np.array([2**31 - 1] * 3, dtype=">i4").tobytes() + good[16:]
    wraps = bytes([0, 0, 0x08, 4]) + np.array([2**31 - 1, 2**31 - 1, 2**31 - 1, 4], dtype=">i4").tobytes()
    negative = bytes([0, 0, 0x08, 2]) + np.array([-2, -2], dtype=">i4").tobytes() + b"\x00" * 4
    return [("empty", b""), ("empty gzip", gzip.compress(b"")), ("truncated gzip", gz[: len(gz) // 2]),
            ("bad gzip CRC", bytes(bad_crc)), ("overflowing dimensions", huge), ("int64-wrapping dimensions", wraps),
            ("negative dimensions", negative), ("header cut short", good[:10]),
            ("wrong magic", b"\x08\x03" + good[2:]), ("unknown type code", good[:2] + b"\x07" + good[3:]),
            ("a text file", b"this is not an IDX file\n")]


def test_broken_idx_files_are_data_errors_naming_the_file(tmp_path):
    good = _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8), 0x08)
    for k, (name, content) in enumerate(_corruptions(good)):
        path = tmp_path / f"case{k}-idx3-ubyte"
        path.write_bytes(content)
        with pytest.raises(data.DataError) as info:
            data.read_idx(path)
        assert str(path) in str(info.value), name
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(data.DataError, match="a-folder"):
        data.read_idx(tmp_path / "a-folder")


def test_fashion_mnist_contents_are_checked(tmp_path):
    cases = {
        "labels out of range": (np.array([0, 1, 2, 10, 4, 255], dtype=np.uint8), "train-labels-idx1-ubyte"),
        "float labels": (np.arange(6, dtype=np.float32), "train-labels-idx1-ubyte"),
        "labels of another count": (np.arange(5, dtype=np.uint8), "train-labels-idx1-ubyte"),
        "no images": (np.zeros((0, 28, 28), dtype=np.uint8), "t10k-images-idx3-ubyte"),
        "int16 images": (np.zeros((3, 28, 28), dtype=np.int16), "t10k-images-idx3-ubyte"),
        "images too small": (np.zeros((3, 2, 2), dtype=np.uint8), "t10k-images-idx3-ubyte"),
    }
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D, np.dtype(np.int16): 0x0B}
    for case, (bad, stem) in cases.items():
        folder = tmp_path / case.replace(" ", "-")
        paths = _fashion_fixture(folder)
        paths[stem].write_bytes(_idx_bytes(bad, codes[bad.dtype]))
        if case == "no images":
            paths["t10k-labels-idx1-ubyte"].write_bytes(_idx_bytes(np.zeros(0, dtype=np.uint8), 0x08))
        with pytest.raises(data.DataError) as info:
            data.load_fashion_mnist(folder)
        assert str(folder / stem) in str(info.value), case


def test_the_demo_reports_a_broken_idx_file_in_one_line(tmp_path, capsys):
    from demos import deq_cifar10

    for case in ("truncated gzip", "bad gzip CRC", "overflowing dimensions", "empty"):
        folder = tmp_path / case.replace(" ", "-")
        paths = _fashion_fixture(folder)
        good = paths["train-images-idx3-ubyte"].read_bytes()
        paths["train-images-idx3-ubyte"].unlink()
        broken = folder / "train-images-idx3-ubyte.gz"
        broken.write_bytes(dict(_corruptions(good))[case])
        assert deq_cifar10.main(["--dataset", "fashion-mnist", "--data-dir", str(folder), "--threads", "1",
                                 "--out", str(tmp_path / "o"), "--no-progress", "--epochs", "1"]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(broken) in err and "Traceback" not in err, case


def test_cifar10_labels_and_truncated_batches_are_checked(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_fixture(folder)
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(data.DataError, match="data_batch_2"):
        data.load_cifar10(tmp_path, download=False)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [3, 10]}, fh, protocol=2)
    with pytest.raises(data.DataError, match="data_batch_2.*label"):
        data.load_cifar10(tmp_path, download=False)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": [["not", "pixels"]], b"labels": [1]}, fh, protocol=2)
    with pytest.raises(data.DataError, match="data_batch_2"):
        data.load_cifar10(tmp_path, download=False)


def test_digits_and_batches():
    d = data.load_digits()
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8) and d.train_x.max() == 16
    small = d.limited(250, 40)
    mean, std = small.channel_stats()
    b = Batches(small.train_x, small.train_y, 100, mean, std, small.max_value, torch.device("cpu"), shuffle=True,
                augment=True, seed=3)
    assert len(b) == 3
    x1, y1 = b.batch(2, 1)
    x2, y2 = b.batch(2, 1)  # batch b of epoch e is always the same: resumable mid-epoch
    assert x1.shape == (100, 1, 8, 8) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(b.batch(3, 1)[1], y1)
    plain = Batches(small.train_x, small.train_y, 100, mean, std, small.max_value, torch.device("cpu"),
                    shuffle=False, augment=False, seed=3)
    xs = torch.cat([x for _, x, _ in plain.epoch(0)])
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-2
    with pytest.raises(ValueError, match="dataset"):
        data.load_dataset("mnist")


# ---------------------------------------------------------------- end to end

def test_digits_end_to_end(tmp_path, capsys):
    from demos import deq_cifar10

    out = tmp_path / "run"
    argv = ["--dataset", "digits", "--solver", "both", "--epochs", "1", "--limit-train", "300", "--limit-test", "200",
            "--fig-iters", "8", "--out", str(out), "--no-progress", "--threads", "1"]
    assert deq_cifar10.main(argv) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "compute saved" in printed
    for name in ("metrics.jsonl", "metrics.csv", "batches.csv", "residuals.csv", "summary.json", "accuracy_vs_time.png",
                 "residuals.png", "iterations_per_batch.png", "checkpoint-forward.pt", "checkpoint-anderson.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["solver"] for r in records] == ["forward", "anderson"]
    for r in records:
        assert r["test_acc"] > 0.2 and r["train_acc"] > 0.1  # chance is 0.1
        assert r["fwd_fev_mean"] > 0 and r["bwd_fev_mean"] > 0 and 0 < r["fwd_converged"] <= 1
        assert r["time_forward_solve"] + r["time_backward_solve"] + r["time_rest"] == pytest.approx(r["time_train"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["m"] == 5 and summary["settings"]["tol"] == 0.01
    assert summary["comparison"]["anderson"]["compute_saved_total"] < 1 and "cpu" in summary["machine"]
    from demos import deq_report  # the summary and plots can be recomputed from the records alone

    (out / "accuracy_vs_time.png").unlink()
    assert deq_report.main([str(out)]) == 0 and (out / "accuracy_vs_time.png").is_file()
    assert "iterations saved per sample" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())["comparison"]["anderson"]
    for key in ("speedup_total_time", "compute_saved_total", "rows_saved_total", "per_sample_saved_total",
                "time_vs_iteration_saving", "common_test_acc", "speedup_cpu_to_acc", "cpu_to_baseline_final_acc",
                "cpu_to_baseline_final_acc_vs_baseline_cpu"):
        want = summary["comparison"]["anderson"][key]
        assert again[key] == (want if want is None else pytest.approx(want)), key
    # A finished run resumes to the same result, and a changed setting is refused: one line naming the
    # checkpoint and the setting, exit status 2.
    assert deq_cifar10.main(argv + ["--resume"]) == 0
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == records
    capsys.readouterr()
    assert deq_cifar10.main(argv + ["--resume", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint-forward.pt" in err and "seed" in err


def test_ctrl_c_saves_and_resume_continues(tmp_path, monkeypatch, capsys):
    from demos import deq_cifar10, deq_training

    def argv_for(out):
        return ["--dataset", "digits", "--solver", "anderson", "--epochs", "1", "--limit-train", "300",
                "--limit-test", "100", "--fig-iters", "3", "--out", str(out), "--no-progress", "--threads", "1"]

    out = tmp_path / "run"
    argv = argv_for(out)
    real = deq_training._train_batch
    calls = []

    def interrupted(run, *a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, *a)

    monkeypatch.setattr(deq_training, "_train_batch", interrupted)
    assert deq_cifar10.main(argv) == 130
    assert "--resume" in capsys.readouterr().err
    state = torch.load(out / "checkpoint-anderson.pt", weights_only=False)
    assert state["epoch"] == 0 and state["next_batch"] == 1 and len(state["batches"]) == 1
    assert json.loads((out / "summary.json").read_text())["interrupted"] == "KeyboardInterrupt"
    monkeypatch.setattr(deq_training, "_train_batch", real)
    assert deq_cifar10.main(argv + ["--resume"]) == 0
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed) == 1 and resumed[0]["epoch"] == 1
    fresh = tmp_path / "fresh"
    assert deq_cifar10.main(argv_for(fresh)) == 0
    again = [json.loads(line) for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):  # the same batches, the same weights
        assert resumed[0][key] == pytest.approx(again[0][key], rel=1e-4, abs=1e-6), key


def test_clear_errors_for_missing_data_and_devices(tmp_path, capsys):
    from demos import deq_cifar10

    base = ["--out", str(tmp_path / "o"), "--no-progress", "--threads", "1"]
    assert deq_cifar10.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "none")] + base) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert deq_cifar10.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--no-download"]
                            + base) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            deq_cifar10.main(["--dataset", "digits", "--device", "cuda"] + base)
        assert "no usable CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        deq_cifar10.main(["--dataset", "digits", "--solver-backend", "cupy"] + base)
    assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        deq_cifar10.main(["--dataset", "digits", "--beta", "0"] + base)
    assert "--beta" in capsys.readouterr().err
