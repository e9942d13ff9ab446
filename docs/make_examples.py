"""Regenerate the Predict tab's example images in docs/examples/ (SYNTHETIC; no patient data).

    python docs/make_examples.py

Three PNGs made by ``covid_cls.synthetic.write_example_images``: a synthetic X-ray with a lesion, one without,
and a colour photo-like picture that is not an X-ray (the app flags it "uncertain"). Each is under 100 KB. The
app uses these files when they are there and otherwise writes the same images into a temporary folder.
"""

from pathlib import Path

from covid_cls.synthetic import write_example_images

if __name__ == "__main__":
    for path in write_example_images(Path(__file__).resolve().parent / "examples"):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
