"""Steps-to-target of learned matching under one setting (rate, warm-up, step budget) on one zoo pair: the held-out
objective after every evaluation, and at the end the midpoint barrier on the test split (loss at t = ½ minus the
mean of the endpoints' losses). Compare settings by steps, not seconds: the wall clock depends on the load.

    python benchmarks/learned_matching_sweep.py vit-digits --steps 200 --lr 3e-2 --warmup 20
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from symmerge.data import load_calibration  # noqa: E402
from symmerge.evaluate import make_evaluator  # noqa: E402
from symmerge.groups import apply_transform, parse_symmetries  # noqa: E402
from symmerge.groups.residual import fold_norms  # noqa: E402
from symmerge.io import load_state_dict, open_checkpoint  # noqa: E402
from symmerge.io.hf import build_model, load_weights, untied_config  # noqa: E402
from symmerge.match.learned import learn_transform, path_loss  # noqa: E402
from symmerge.match.weights import match_weights  # noqa: E402
from symmerge.spec import spec_for  # noqa: E402
from symmerge.zoo import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=25)
    args = parser.parse_args()
    a_dir, b_dir = build(args.pair, 0), build(args.pair, 1)
    ca = open_checkpoint(a_dir)
    a, b = load_state_dict(ca), load_state_dict(open_checkpoint(b_dir))
    batches = load_calibration("zoo", model_dir=a_dir, num_examples=2048, labels=True, batch_size=64)
    spec, chosen = spec_for(ca.config, a.keys()), parse_symmetries("all,residual")
    init = match_weights(a, b, spec, chosen)
    ref, model = init.folded_reference, fold_norms(b, spec.residual)
    loss = path_loss(ca.config, ref, untie=True)
    held = batches[3::4]
    with torch.no_grad():  # the straight line's height on the objective's batches: both endpoints' mean loss
        base = sum(float(loss(ref, x)) + float(loss(model, x)) for x in held) / (2 * len(held))
    cpu = time.process_time()
    transform, record = learn_transform(ref, model, spec, init.transform, loss, batches, symmetries=chosen, steps=args.steps,
                                        lr=args.lr, warmup=args.warmup, eval_every=args.eval_every)
    print(f"{args.pair}: lr {args.lr} warm-up {args.warmup}: {record['steps']} steps, {record['seconds']:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU, halvings {record['halvings']}, load {os.getloadavg()[0]:.1f}")
    for step, value, mid, seconds in record["evaluations"]:
        print(f"  step {step:5d} ({seconds:5.0f} s): objective − endpoints {value - base:.4f}, midpoint − endpoints {mid - base:.4f}")
    evaluate = make_evaluator("zoo", a_dir)
    module = build_model(untied_config(ca.config, True), ref)
    aligned = apply_transform(model, spec, transform)
    losses = {}
    for t in (0.0, 0.5, 1.0):
        load_weights(module, {k: torch.lerp(ref[k].float(), v.float(), t) if v.is_floating_point() else v for k, v in aligned.items()})
        losses[t] = evaluate(module)["loss"]
    print(f"  test midpoint barrier {losses[0.5] - (losses[0.0] + losses[1.0]) / 2:.4f} (best step {record['best_step']})")


if __name__ == "__main__":
    main()
