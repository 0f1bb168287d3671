"""``python -m model_export``: the whaleid-export command line."""

from model_export.cli import main

raise SystemExit(main())
