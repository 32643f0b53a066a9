"""``python -m convert --hf-path GSAI-ML/ReFusion --mlx-path refusion-4bit -q``; installed as ``refusion-convert``."""

import sys

try:
    from refusion_mlx.convert import main
except KeyboardInterrupt:  # Ctrl-C while importing: one line, as once running
    print("interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.argv[0] = "python -m convert"  # its --help shows how it was started (cli.prog)
sys.exit(main())
