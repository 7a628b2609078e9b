"""Set-up for the whole test session: the test-only presets (``presets.py``)."""

import presets  # tests/ is on the path: pyproject's pythonpath

presets.register()
