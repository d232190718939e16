"""Entry point for the `deepspeed` launcher (and torchrun):

    deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml [--resume [PATH]] [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ds_finetune.train import main  # noqa: E402

if __name__ == "__main__":
    main()
