"""covid_cls web app — wiring only. Hugging Face Spaces (Gradio SDK) runs this file; `demo` is importable.

Research demo — not a diagnosis.
"""

from covid_cls.ui import build_app, launch

demo = build_app()

if __name__ == "__main__":
    launch(demo)
