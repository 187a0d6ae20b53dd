"""The one rule for VM names, shared by machine files, the CLI and the run dirs: a name
becomes a folder name, so it never contains a path separator or dots alone.
"""

from __future__ import annotations

NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"

NAME_RULE = "1 to 63 lowercase letters, digits, '_' or '-', starting with a letter or digit"
