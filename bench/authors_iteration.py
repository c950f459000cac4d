"""The authors' SiD / SiDA iteration as a step function: the yardstick of bench.compare.

Their `training_loop` (the checkout at bench.authors.AUTHORS_COMMIT) runs as they wrote it, in
this process, one while-body per `step()`: `patched_training_loop(pause=True)` makes it a
generator that yields after each iteration's image count update. The first `step()` runs two
iterations and their set-up (dataset, networks from the teacher pickle, Adam, the sample grid and snapshot they
write at 0 kimg), so bench.compare's untimed first iterations absorb it. Their status line and
stats file come at ticks only: the first iteration's, then never (`kimg_per_tick` 10^6, no
snapshots, no metrics), so a timed step is the while-body alone.

Same start as ours: the teacher's weights (ported with `to_authors`, strict), the batch, the
data (bench.step.MemoryDataset served through their Dataset interface), the run settings, one
accumulation round. `discriminator=False` is their SiD path (`use_gan=False`), True their SiDA
path with the adversarial terms on from the first iteration (phase literals at -1), as ours in a
one-phase `sida` run.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import tempfile
from pathlib import Path

import torch

from bench.authors import authors_runtime, load_checkout, loop_kwargs, patched_training_loop, serve, to_authors


class AuthorsIteration:
    """`step()` runs one iteration of the authors' loop; `holds()` lists what it keeps alive
    (networks and optimisers, for bench.compare's memory figures)."""

    def __init__(self, repo: Path, rc: dict, teacher: torch.nn.Module, dataset, discriminator: bool,
                 seed: int = 1, device: torch.device = torch.device("cpu")) -> None:
        self.commit = load_checkout(repo)
        self._tmp = tempfile.TemporaryDirectory(prefix="authors-iteration-")
        run_dir = Path(self._tmp.name)
        labels = dataset.onehot.argmax(dim=1).numpy() if dataset.onehot.shape[1] else None
        dataset_class = serve(dataset.images, labels)
        pkl = run_dir / "teacher.pkl"
        with open(pkl, "wb") as f:
            pickle.dump({"ema": to_authors(teacher)}, f)  # their copy on the CPU, as a pickle holds it
        rc = dict(rc, teacher_kwargs=teacher.init_kwargs)
        loop = patched_training_loop(-1, -1, lambda **k: None, self._keep, pause=True)
        self._run = loop(**loop_kwargs(rc, run_dir, pkl, seed, 10 ** 12, discriminator, rc["lr_g"], dataset_class,
                                       device))
        self._nets: dict = {}
        self._started = False

    def _keep(self, cur_nimg: int, G, G_ema, fake_score) -> None:
        """Their networks, seen by the iteration hook (a reference: nothing is copied)."""
        self._nets.update(G=G, G_ema=G_ema, fake=fake_score)

    def step(self) -> None:
        if self._started:
            next(self._run)
            return
        # Their set-up and first iteration, then the first tick's status line (it runs when the loop
        # resumes): CUDA / distributed calls as one CPU process, the printout kept off the report.
        with authors_runtime(), contextlib.redirect_stdout(io.StringIO()):
            next(self._run)
            next(self._run)
        self._started = True

    def holds(self) -> list:
        """Their teacher, G, G_ema, fake score and both Adams (live in the paused loop's frame)."""
        f = self._run.gi_frame.f_locals
        return [f["true_score"], self._nets["G"], self._nets["G_ema"], self._nets["fake"],
                f["fake_score_optimizer"], f["g_optimizer"]]
