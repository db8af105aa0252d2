"""Print the Markdown table of every train_gpt.py setting (name, default, meaning) for README.md.

    python3 tools/flags_table.py > /tmp/flags.md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def table() -> str:
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for name, default, meaning in train_gpt.SETTINGS:
        shown = train_gpt.env_form(default) if default != "" else "(empty)"
        rows.append(f"| `{name}` | `{shown}` | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
