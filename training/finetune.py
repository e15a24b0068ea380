"""Fine-tune a Segue model on a folder of MIDI files (your catalogue, an artist's).

    segue finetune --data ~/midi/my-band --from models/default --out runs/my-band
    segue finetune --data ~/midi/my-band --from runs/default/best.safetensors --out runs/my-band --export models/my-band
    segue finetune --out runs/my-band --resume        # continue an interrupted fine-tune exactly
    torchrun --nproc_per_node 2 -m training.finetune --data ~/midi/my-band --out runs/my-band

Fine-tuning is the one training run (training/train.py) with this table of defaults, as nanoGPT's
`config/finetune_shakespeare.py` is its `train.py` with `init_from` and a lower learning rate:
start from a base model instead of a random init, learn at a sixth of pretraining's rate, hold out
a fifth of the files, stop early after 5 evaluations without improvement, and augment more (a
catalogue is small). `--from` takes a model folder (its hashes are verified, the PyTorch model is
rebuilt from its ONNX weights and checked against ONNX Runtime) or a `.safetensors` checkpoint; the
vocabulary always comes from the base. The split is by content hash (the same file always lands on
the same side). The summary compares the best validation perplexity with the base model's on the
same validation files. With `--export` the best checkpoint becomes a model folder whose manifest
names the base model's sha256 and the fine-tune data fingerprint; without it, the `export-onnx`
command to run is printed.
"""

from __future__ import annotations

from training import train
from training.augment import AugmentConfig
from training.options import RunDefaults

FINETUNE = RunDefaults(
    command="finetune", init_from="base", desc="fine-tuning",
    description="Fine-tune a model on a folder of MIDI files, starting from a model folder or a checkpoint. "
                "Writes checkpoints and logs to --out; --export turns the best one into a model folder.",
    lr=1e-4, warmup=100, max_steps=3000, eval_every=100, val_fraction=0.2, patience=5,
    augment=AugmentConfig(transpose=5, velocity_jitter=8, tempo_low=0.8, tempo_high=1.2, tempo_copies=2),
)


def main(argv: list[str] | None = None) -> int:
    return train.main(argv, FINETUNE)


if __name__ == "__main__":
    raise SystemExit(main())
