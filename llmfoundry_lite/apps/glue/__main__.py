"""Worker process of a parallel GLUE run: ``python -m llmfoundry_lite.apps.glue SPEC.json`` runs one job."""

import sys

from llmfoundry_lite.apps.glue.orchestrate import worker_main

if __name__ == "__main__":
    worker_main(sys.argv[1])
