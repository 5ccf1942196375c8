"""‖∂f/∂z‖²_F at the fixed point, per test sample, of the models a DEQ demo run trained.

For each checkpoint (``checkpoint-SOLVER.pt`` of ``demos/deq_cifar10.py``) the model's DEQ is
solved on the run's test images (Anderson, the run's tolerance, in eval mode) and
:func:`fixedpoint.torch.jacobian_frobenius` estimates ‖∂f/∂z‖²_F at z* with ``--probes``
Gaussian probes per sample; printed: the mean over the test images, and the mean per-sample
iterations of the solve.  Used to see what Jacobian regularisation (``--jac-reg``) changed.

Example::

    python -m demos.deq_jacobian out/deq-digits/checkpoint-anderson.pt out/deq-jacreg/checkpoint-anderson.pt
"""

from __future__ import annotations

import argparse

import torch

from demos.cli import refuse
from demos.data import DataError
from demos.deq_training import CheckpointError, TrainedRun
from tooling.timing import add_threads_flag, positive_int, use_threads


def make_parser():
    p = argparse.ArgumentParser(prog="python -m demos.deq_jacobian", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint-SOLVER.pt files written by demos/deq_cifar10.py")
    p.add_argument("--probes", type=positive_int, default=8, help="probes per sample (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="as for demos/deq_cifar10.py")
    add_threads_flag(p)
    return p


def jacobian_on_test_set(path, probes, seed, data_dir=None):
    """(mean ‖∂f/∂z‖²_F estimate, mean per-sample iterations) over the test images of the run of ``path``."""
    run = TrainedRun(path, data_dir)
    test = run.batches(train=False)
    model = run.model(dict(method="anderson", tol=run.cfg.tol, max_iter=run.cfg.max_iter))
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count, iters = 0.0, 0, 0.0
    for _, images, _ in test.epoch(0):
        with torch.no_grad():
            x = model.injection(images)
        _, jac = _with_generator(model, x, probes, gen)
        total += float(jac.detach().sum())
        count += int(images.shape[0])
        iters += model.deq.stats.forward.n_iter_mean * images.shape[0]
    return total / count, iters / count


def _with_generator(model, x, probes, gen):
    """The layer's estimate with probes drawn from ``gen`` (reproducible whatever else drew numbers)."""
    state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    try:
        return model.deq(x, jacobian_probes=probes)
    finally:
        torch.set_rng_state(state)


def main(argv=None):
    """Estimate with the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 when done; 2 for an error in the flags, a checkpoint or the data (one line on stderr).
    """
    args = make_parser().parse_args(argv)
    print(use_threads(args.threads), flush=True)
    for path in args.checkpoints:
        try:
            jac, iters = jacobian_on_test_set(path, args.probes, args.seed, args.data_dir)
        except (CheckpointError, DataError) as exc:
            return refuse(exc)
        print(f"{path}: ||df/dz||_F^2 per test sample {jac:.1f} ({args.probes} probes), Anderson iterations per "
              f"sample {iters:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
