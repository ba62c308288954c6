"""Entry point for `accelerate launch train.py --config ...` and `python train.py --config ...`.

The program lives in embedtune/commands/train.py (the loop in embedtune/training/trainer.py), so
the installed `embedtune train` command runs the very same loop; read it there.
"""

import sys

from embedtune.commands.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
