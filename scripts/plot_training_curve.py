"""Plot a training run's curve: training loss per epoch and held-out mean Dice where it was validated.

    .venv/bin/python scripts/plot_training_curve.py artifacts/runs/mni-tissue-tiny-v2 artifacts/models/mni-tissue-tiny.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnslim.compiler.runtime.volumes.preview import import_pyplot
from nnslim.files import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `nnslim train` output folder (its history.json)")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args()
    history = json.loads((args.run / "history.json").read_text())
    plt = import_pyplot()
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    epochs = [h["epoch"] + 1 for h in history]
    loss_axis.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", label="training loss (Dice + CE)")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    dice_axis = loss_axis.twinx()
    validated = [h for h in history if "val_mean_dice" in h]
    dice_axis.plot([h["epoch"] + 1 for h in validated], [h["val_mean_dice"] for h in validated], "o-",
                   color="tab:red", label="held-out mean Dice (GM, WM)")
    dice_axis.set_ylabel("held-out mean Dice", color="tab:red")
    dice_axis.set_ylim(0, 1)
    lines = loss_axis.get_lines() + dice_axis.get_lines()
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="center right")
    loss_axis.set_title(f"{args.run.name}: {len(history)} epochs")
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, format="png")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
