"""Train the float CIFAR-10 model for a profile and compare accuracy and time with the profile's targets.

    python benchmarks/train_float.py --profile full  --seed 0 --out /work/cache/checkpoints/cifar_resnet_full.pt
    python benchmarks/train_float.py --profile smoke --seed 0 --out /tmp/smoke.pt

Targets: full >= 91 % test accuracy in <= 40 min of training on 2 CPU cores; smoke > 50 % in <= 2 min.
Also measures, in the same run, the training-step time of float32 against bfloat16 autocast, and of stages
that pool after BN against pool-first stages (the two peers the recipe's speed relies on), and prints their
ratios (single-thread CPU time of a step, ``calibkit.cifar.budget.measure_speed``). Before training it prints the
time budget's plan for this machine (``plan_training``: the estimate, and the epochs a budget would choose);
``--time-budget-minutes`` trains those epochs instead of the profile's. Writes the checkpoint to --out and a metrics JSON beside
it (same name, .json). Times on a shared machine are inflated by other processes: the load average at start
and end is printed so the numbers can be read in context.
"""

import argparse
import json
import os
import pathlib
import sys
import time

import torch

from calibkit.cifar.budget import measure_speed, plan_training
from calibkit.cifar.checkpoint import save_checkpoint
from calibkit.cifar.data import load_cifar10, normalize
from calibkit.cifar.evaluate import accuracy, bf16_supported, confusion_matrix, per_class_accuracy, predict
from calibkit.cifar.train import PROFILES, profile_dataset, train_profile

TARGETS = {"full": (0.91, 40 * 60), "smoke": (0.50, 2 * 60)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    ap.add_argument("--data-dir", default=None, help="default: $CALIBKIT_DATA_DIR or ~/.cache/calibkit/data")
    ap.add_argument("--out", required=True, help="checkpoint path to write")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice, one per core); on a machine shared with "
                         "other busy processes 1 thread can be several times faster than 2")
    ap.add_argument("--no-peers", action="store_true", help="skip the step-time comparisons (float32 vs bfloat16, "
                    "pool after BN vs pool first)")
    ap.add_argument("--time-budget-minutes", type=float, default=None,
                    help="train the epochs plan_training chooses for this budget (default: the profile's epochs)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)

    t = time.perf_counter()
    ds = load_cifar10(args.data_dir, progress=not args.no_progress)
    print(f"data: {ds} loaded in {time.perf_counter() - t:.1f} s", flush=True)
    cfg = PROFILES[args.profile]

    if not args.no_peers:
        def step(amp, pool_first):  # single-thread CPU seconds of one step at the profile's batch size
            speed = measure_speed(cfg["width"], cfg["batch_size"], amp=amp, pool_first=pool_first)
            return speed.single_thread_step_seconds
        fp32 = step(False, False)
        amp = bf16_supported("cpu")
        after_bn = step(True, False) if amp else fp32  # the precision train uses
        if amp:
            print(f"step time at batch {cfg['batch_size']} (1 thread, CPU time): float32 {fp32:.3f} s, bf16 autocast "
                  f"{after_bn:.3f} s, speed-up {fp32 / after_bn:.2f}x", flush=True)
        else:
            print(f"step time at batch {cfg['batch_size']} (1 thread, CPU time): float32 {fp32:.3f} s (no fast bf16 "
                  "on this CPU)", flush=True)
        first = step(amp, True)
        print(f"step time at batch {cfg['batch_size']} ({'bf16' if amp else 'float32'}): pool after BN {after_bn:.3f} s, "
              f"pool first {first:.3f} s, speed-up {after_bn / first:.2f}x", flush=True)

    sub = profile_dataset(ds, args.profile, args.seed)
    plan = plan_training(args.profile, len(sub.train_labels), len(sub.test_labels), epochs=args.epochs,
                         time_budget_minutes=args.time_budget_minutes)
    print(plan.describe(), flush=True)
    model, hist = train_profile(ds, args.profile, seed=args.seed, epochs=plan.epochs, progress=not args.no_progress,
                                **plan.overrides)
    t = time.perf_counter()
    logits = predict(model, sub.test_images)
    preds = logits.argmax(1)
    cm = confusion_matrix(preds, sub.test_labels, len(ds.classes))
    acc = (preds == sub.test_labels).float().mean().item()
    acc_tta = accuracy(model, sub.test_images, sub.test_labels, tta=1)
    acc_tta2 = accuracy(model, sub.test_images, sub.test_labels, tta=2)
    eval_s = time.perf_counter() - t
    train_s, total_eval_s = hist["train_seconds"], sum(hist["eval_seconds"])

    metrics = {"profile": args.profile, "seed": args.seed, "test_accuracy": acc, "test_accuracy_tta": acc_tta,
               "test_accuracy_tta2": acc_tta2,
               "train_seconds": train_s, "eval_seconds_during_training": total_eval_s, "epochs": hist["epochs"],
               "num_train": hist["num_train"], "num_test": hist["num_test"], "data_source": sub.source,
               "checkpoint": str(out), "per_class_accuracy": dict(zip(ds.classes, per_class_accuracy(cm).tolist())),
               "history": {k: hist[k] for k in ("epoch", "train_loss", "train_accuracy", "test_accuracy", "epoch_seconds")},
               "hyperparameters": {k: hist[k] for k in ("batch_size", "lr", "momentum", "weight_decay", "label_smoothing",
                                                        "warmup_epochs", "translate", "head_lr_scale", "bias_lr_scale",
                                                        "freeze_bn_weight", "bn_momentum", "logit_scale", "lookahead",
                                                        "alternate_flip", "whiten", "pool_first", "amp")},
               "arch": hist["arch"], "arch_kwargs": hist["arch_kwargs"], "load_average_end": os.getloadavg()[0],
               "training_plan": plan.as_dict()}
    save_checkpoint(out, model, {k: v for k, v in metrics.items() if k != "checkpoint"} | {"classes": ds.classes})
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=2))

    target_acc, target_s = TARGETS[args.profile]
    print(f"\nprofile {args.profile}, seed {args.seed}, {hist['epochs']} epochs, {hist['num_train']} train / "
          f"{hist['num_test']} test images, data {sub.source}")
    print(f"test accuracy      {100 * acc:6.2f} %  (target {'>=' if args.profile == 'full' else '>'} {100 * target_acc:.0f} %, "
          f"ratio {acc / target_acc:.3f})")
    print(f"  with flip TTA    {100 * acc_tta:6.2f} %  (tta=1, reference only)")
    print(f"  flip + shift TTA {100 * acc_tta2:6.2f} %  (tta=2, 6 views, reference only)")
    print(f"training time      {train_s:7.1f} s  (target <= {target_s} s, ratio {train_s / target_s:.3f}); "
          f"+ {total_eval_s:.1f} s test evaluation during training, {eval_s:.1f} s final evaluation")
    print(f"load average at end {os.getloadavg()[0]:.1f} (2 cores: > 2 means other processes shared them)")
    print(f"checkpoint: {out}\nmetrics:    {out.with_suffix('.json')}")
    met = (acc >= target_acc if args.profile == "full" else acc > target_acc) and train_s <= target_s
    print("targets met" if met else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
