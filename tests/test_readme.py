"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    body = text[text.index(f"<!-- SECTION:{section} -->") : text.index(f"<!-- END:{section} -->")]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks("python-api"))))
def test_python_api_examples_run(index):
    exec(compile(python_blocks("python-api")[index], f"README python block {index}", "exec"), {})
