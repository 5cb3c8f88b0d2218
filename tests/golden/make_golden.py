"""Record the golden results that ``tests/test_golden.py`` checks (run only on purpose).

    python tests/golden/make_golden.py

Every registered method on two benchmark images with the bundled ViT, its maps average-pooled
to 28×28, and the per-image rows of a short comparison of the six seed methods. Recorded
before a refactoring that must not change results, and checked after it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent.parent))
from test_golden import HERE, golden_maps, golden_rows  # noqa: E402


def main() -> None:
    save_file(golden_maps(), str(HERE / "maps.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = golden_rows(Path(tmp) / "run")
    (HERE / "rows.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"recorded with torch {torch.__version__} in {HERE}")


if __name__ == "__main__":
    main()
