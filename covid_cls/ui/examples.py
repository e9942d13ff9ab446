"""The Predict tab's clickable examples (issue 12 #4): three SYNTHETIC images we may ship (docs/examples/, made
by ``docs/make_examples.py``): an X-ray-like image with a lesion, one without, and a photo that is not an X-ray.

Gradio copies example files into its cache when the app is built, and only from the working directory or the
system's temporary folder: when docs/examples is elsewhere (the app started from another folder, an installed
package without docs/), the same images are written once per process into a temporary folder. Nothing is
predicted ahead of time (``cache_examples=False``): start-up stays fast.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
_made: dict[str, Path] = {}


def example_paths() -> list[tuple[str, str]]:
    """(path, label) of each example, in the order of ``synthetic.EXAMPLES``."""
    from ..synthetic import EXAMPLES, write_example_images

    folder = REPO_EXAMPLES
    usable = all((folder / name).is_file() for name in EXAMPLES) and folder.is_relative_to(Path.cwd().resolve())
    if not usable:
        if "tmp" not in _made:
            _made["tmp"] = Path(tempfile.mkdtemp(prefix="covid_cls-examples-"))
            write_example_images(_made["tmp"])
        folder = _made["tmp"]
    return [(str(folder / name), label) for name, label in EXAMPLES.items()]
