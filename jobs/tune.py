"""`ray job submit --working-dir . -- python jobs/tune.py --config configs/tune-demo.yaml --out DIR [--set k=v]`"""

import sys

from gram_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
