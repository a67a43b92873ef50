"""Convert a corpus to MDS shards: a thin entry to `llmfoundry-lite data convert` (same options).

python scripts/convert_dataset.py --source embedded --out data/embedded
python scripts/convert_dataset.py --source hf:allenai/c4:en --out data/c4 --tokenizer TOK --concat-tokens 2048
"""

from __future__ import annotations

import sys

from llmfoundry_lite.data.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["convert"]
    main()
