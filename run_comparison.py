"""Seed-compatible entry point: ``python run_comparison.py --methods LIME KernelSHAP ...``.

Accepts the original comparison's flags (--methods, --idx_sample_img, --save_attr_maps,
--sample_size, and --subset_size) and every option of ``vitxai compare``.
"""

import sys

from vitxai.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
