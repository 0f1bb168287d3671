"""``python -m training``: the whaleid-train command line."""

from training.cli import main

raise SystemExit(main())
