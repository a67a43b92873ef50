"""Training entry for Composer's launcher: ``composer -n 8 scripts/train.py RECIPE.yaml [key=value ...]``."""

import sys

from llmfoundry_lite.train.launch import entrypoint

if __name__ == "__main__":
    sys.exit(entrypoint(sys.argv[1:]))
