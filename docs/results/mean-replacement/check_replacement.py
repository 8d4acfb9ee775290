"""Is mean replacement implemented right, and would another mean do better? A check on a
trained model of study B.

    PRUNELAB_DATA=../shared/data python docs/results/mean-replacement/check_replacement.py \
        results/study-b-session/cache/dense/<file>.pt [--model small_conv] [--trials 6]

For each unit layer and for 10 % and 50 % of its units chosen at random, the calibration-loss
penalty (1000 training images, as in the study) of:

* zero:       the units removed (output 0);
* folded:     prunelab's mean replacement: the mean activation over the images and positions,
              folded into the next layer's bias (docs/methods.md §5);
* reference:  the same constant written into the activations by a forward hook, with
              no folding: the definition itself (for a conv consumer it differs from
              "folded" only at zero-padded borders);
* post-pool:  the mean of what the next layer actually receives (after max-pooling),
              folded the same way: a variant docs/methods.md does not define.

Mean of ``--trials`` random subsets per cell.
"""

from __future__ import annotations

import argparse
import copy

import torch

import prunelab
from prunelab.training import evaluate
from prunelab.units import Units, surgery
from prunelab.units.scoring import collect, select


def penalty(model, cal, before, hook=None) -> float:
    handle = hook() if hook else None
    try:
        return evaluate(model, cal)["loss"] - before
    finally:
        if handle is not None:
            handle.remove()


def consumer_means(model, info, x) -> dict:
    """Per unit layer: the mean over images (and positions) of each channel at the consumer's input."""
    means = {}
    for unit in info.layers:
        seen = []
        handle = unit.consumer.module.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
        with torch.no_grad():
            model(x)
        handle.remove()
        z = seen[0]
        means[unit.name] = (
            z.mean(dim=(0, 2, 3)) if z.dim() == 4 else z.reshape(len(z), unit.n_units, -1).mean(dim=(0, 2))
        ).double()
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights")
    parser.add_argument("--model", default="small_conv")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (picks the calibration subset)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ds = prunelab.load_dataset(args.dataset)
    model = prunelab.build_model(args.model, dataset=ds, seed=0)
    model.load_state_dict(torch.load(args.weights, weights_only=True, map_location="cpu")["state_dict"])
    model.eval()
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(10_000 + args.seed))[:1000]
    cal = (ds.x_train[order], ds.y_train[order])
    info = Units.of(model, tuple(ds.input_shape))
    stats = collect(model, info.layers, [(cal[0][i : i + 250], cal[1][i : i + 250]) for i in range(0, 1000, 250)])
    post = consumer_means(model, info, cal[0])
    before = evaluate(model, cal)["loss"]
    generator = torch.Generator().manual_seed(1)

    print(
        f"{args.model} on {args.dataset}, {args.weights}; calibration loss {before:.4f}; "
        f"mean of {args.trials} random subsets\n"
    )
    print("| layer | removed | zero | folded (prunelab) | reference (hook) | post-pool mean |")
    print("|---|---:|---:|---:|---:|---:|")
    for unit in info.layers:
        for fraction in (0.1, 0.5):
            sums = [0.0] * 4
            for _ in range(args.trials):
                chosen = select(torch.rand(unit.n_units, generator=generator, dtype=torch.float64), fraction=fraction)
                for k, means in enumerate((None, stats[unit.name].mean, None, post[unit.name])):
                    pruned = copy.deepcopy(model)
                    if k == 2:  # the reference: write the mean into the activations
                        point = dict(pruned.named_modules())[
                            next(n for n, m in model.named_modules() if m is unit.point)
                        ]
                        mean = stats[unit.name].mean.float()

                        def hook(point=point, chosen=chosen, mean=mean):
                            def replace(module, inputs, output):
                                output = output.clone()
                                shape = (1, -1, 1, 1) if output.dim() == 4 else (1, -1)
                                output[:, chosen] = mean[chosen].view(shape).expand_as(output[:, chosen])
                                return output

                            return point.register_forward_hook(replace)

                        sums[k] += penalty(pruned, cal, before, hook)
                        continue
                    plan = {unit.name: chosen}
                    surgery.mask_units(
                        Units.of(pruned, tuple(ds.input_shape)).chain,
                        plan,
                        None if means is None else {unit.name: means},
                    )
                    sums[k] += penalty(pruned, cal, before)
            cells = " | ".join(f"{s / args.trials:.4f}" for s in sums)
            print(f"| {unit.name} | {100 * fraction:.0f} % | {cells} |")


if __name__ == "__main__":
    main()
