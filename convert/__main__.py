"""``python -m convert --hf-path GSAI-ML/ReFusion --mlx-path refusion-4bit -q``; installed as ``refusion-convert``."""

import sys

from refusion_mlx.convert import main

sys.exit(main())
