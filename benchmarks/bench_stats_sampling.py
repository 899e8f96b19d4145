"""Does sampling the per-weight gradient statistics every k-th step change the pruning decisions?

``GradientStatistics(weight_every=k)`` folds only every k-th optimizer step into the per-weight mean / std (a
Welford update costs about a third of an Adam step; every k-th step costs 1/k of that on average). The mean and
variance over steps stay unbiased estimates, from k times fewer samples. This script measures what that does to the
masks, on real data, on the trajectory a real pruning fit takes:

* a plain PyTorch loop (AdamW, the demo models' optimizer) trains the digits MLP (scikit-learn's 8x8 digits) or
  ``SmallCNN`` on MNIST-5k; the tracked weights are the Linear / Conv weights (the callback's default selection);
* the callback's default schedule (``PruningSchedule.for_fit``: polynomial ramp from 10 % to 70 % of the fit, ten
  events) prunes to ``--sparsity`` with the default ``weighted_stability`` criterion (``--criterion`` to change);
  statistics accumulate from the start (``restart_statistics=False``, the default) or restart after each event
  (``--restart``);
* statistics with k = 1, 2, 3, 4 are fed the same gradients; at each event each proposes its masks from the same
  current masks; the fit follows k = 1 (``--follow K`` follows another);
* printed per event: the Jaccard index of the weights each k newly prunes against k = 1 (the weights pruned before
  the event, common to all, left out) and, as the floor set by the data, the Jaccard of two disjoint halves of the
  steps (even steps vs odd steps, each a k = 2 sample);
* and the excess score: the k = 1 scores of what k prunes minus those of what k = 1 prunes, summed, as a fraction
  of the k = 1 score of all the weights alive before the event (how much more of the reference criterion's
  importance k's choice removes; 0 when the choices are equal, small when they differ only among near-tied weights);
* at the end: validation accuracy of the model that followed, and (``--follow``) of fits that follow each k.

Run: ``python benchmarks/bench_stats_sampling.py --model digits`` (seconds) or ``--model cnn`` (a minute or two).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_compress.core.selection import DEFAULT_MODULE_TYPES, select_modules
from lightning_compress.demos.data import DigitsDataModule, MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier, SmallCNN
from lightning_compress.pruning.criteria import weight_scores
from lightning_compress.pruning.schedule import PruningSchedule
from lightning_compress.pruning.selection import keep_masks
from lightning_compress.pruning.statistics import GradientStatistics

KS = (1, 2, 3, 4)


def _setup(model_name: str, seed: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    if model_name == "digits":
        dm, model = DigitsDataModule(batch_size=32, seed=seed), MLPClassifier(64, [256, 128])
    else:
        dm, model = MNIST5kDataModule(batch_size=64, seed=seed), SmallCNN(28)
    dm.setup("fit")
    return dm, model


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _pruned(new: list[torch.Tensor], alive: list[torch.Tensor]) -> torch.Tensor:
    """The weights ``new`` prunes among those ``alive`` before the event, flattened."""
    return torch.cat([(~n & a).flatten() for n, a in zip(new, alive)])


def fit(model_name: str, epochs: int, sparsity: float, criterion: str, follow: int, restart: bool,
        seed: int) -> tuple[float, list[dict]]:
    dm, model = _setup(model_name, seed)
    train = dm._splits["train"]
    loader = torch.utils.data.DataLoader(train, batch_size=dm.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    modules = select_modules(model, DEFAULT_MODULE_TYPES)
    names, weights = list(modules), [m.weight for m in modules.values()]
    shapes = [w.shape for w in weights]
    total = epochs * len(loader)
    schedule = PruningSchedule.for_fit("polynomial", sparsity, total, "step")
    make = lambda k: GradientStatistics(names, shapes, per_weight=True, per_unit=False, weight_every=k)  # noqa: E731
    stats = {k: make(k) for k in KS}
    odd = make(1)  # fed the odd steps only: with stats[2] (the even steps), two disjoint halves
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    optimizer = model.configure_optimizers()
    events, step, window = [], 0, 0  # window: steps since the statistics (re)started
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads = [w.grad for w in weights]
            with torch.no_grad():
                for s in stats.values():
                    s.update(grads, weights)
                if window % 2 == 1:  # stats[2] takes the even steps of the window
                    odd.update(grads, weights)
                for g, m in zip(grads, masks):
                    g.mul_(m)
            optimizer.step()
            with torch.no_grad():
                for w, m in zip(weights, masks):
                    w.mul_(m)
            step, window = step + 1, window + 1
            target = schedule.target(step)
            if target is None:
                continue
            scores = {k: weight_scores(criterion, weights, s) for k, s in stats.items()}
            proposal = {k: keep_masks(scores[k], masks, target) for k in KS}
            reference = torch.cat([s.flatten() for s in scores[1]])  # k = 1's scores judge every choice
            halves = [keep_masks(weight_scores(criterion, weights, s), masks, target) for s in (stats[2], odd)]
            base = _pruned(proposal[1], masks)
            row = dict(step=step, target=target, samples=stats[1].weight_count, newly_pruned=int(base.sum()),
                       halves=_jaccard(*(_pruned(h, masks) for h in halves)))
            row.update({f"k={k}": _jaccard(base, _pruned(proposal[k], masks)) for k in KS[1:]})
            alive = torch.cat([m.flatten() for m in masks])
            lost, present = float(reference[base].sum()), float(reference[alive].sum())
            row.update({f"excess k={k}": (float(reference[_pruned(proposal[k], masks)].sum()) - lost) / present
                        for k in KS[1:]})
            events.append(row)
            masks = proposal[follow]
            with torch.no_grad():
                for w, m in zip(weights, masks):
                    w.mul_(m)
            if restart:
                for s in (*stats.values(), odd):
                    s.reset()
                window = 0
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return correct / n, events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits", "cnn"), default="digits")
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 (digits), 4 (cnn)")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--criterion", default="weighted_stability")
    parser.add_argument("--restart", action="store_true", help="statistics restart after each event")
    parser.add_argument("--follow", type=int, nargs="*", default=[1], help="the k whose masks each fit follows")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    epochs = args.epochs or (10 if args.model == "digits" else 4)
    print(f"{args.model}, {epochs} epochs, sparsity {args.sparsity}, {args.criterion}, "
          f"{'restart' if args.restart else 'cumulative'} statistics, seeds {args.seeds}")
    summary: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for follow in args.follow:
            acc, events = fit(args.model, epochs, args.sparsity, args.criterion, follow, args.restart, seed)
            summary.setdefault(f"acc follow k={follow}", []).append(acc)
            print(f"seed {seed}, fit following k={follow}: val accuracy {acc:.4f}")
            if follow != 1:
                continue
            print(f"  {'step':>5}{'target':>8}{'samples':>8}{'pruned':>8}" + "".join(f"{f'k={k}':>8}" for k in KS[1:])
                  + f"{'halves':>8}" + "".join(f"{f'+k={k}':>9}" for k in KS[1:])
                  + "  (Jaccard of newly pruned sets vs k=1; halves: even vs odd steps; +k: excess k=1 score pruned)")
            for e in events:
                print(f"  {e['step']:>5}{e['target']:>8.3f}{e['samples']:>8}{e['newly_pruned']:>8}"
                      + "".join(f"{e[f'k={k}']:>8.3f}" for k in KS[1:]) + f"{e['halves']:>8.3f}"
                      + "".join(f"{100 * e[f'excess k={k}']:>8.3f}%" for k in KS[1:]))
                for key in (*(f"k={k}" for k in KS[1:]), "halves", *(f"excess k={k}" for k in KS[1:])):
                    summary.setdefault(key, []).append(e[key])
    print("summary (Jaccard over all events and seeds: mean, min; excess: mean, max; accuracies: mean, min):")
    for key, values in summary.items():
        extreme = max(values) if key.startswith("excess") else min(values)
        print(f"  {key:<16} mean {statistics.mean(values):.4f}  {'max' if key.startswith('excess') else 'min'} "
              f"{extreme:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
