import argparse
import sys

from launcher.local import launch

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m launcher", description="start N local peft-dist processes")
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    a = p.parse_args()
    sys.exit(launch(a.nproc, a.argv))
