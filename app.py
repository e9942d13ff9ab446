"""covid_cls web app — wiring only. Hugging Face Spaces (Gradio SDK) runs this file; `demo` is importable.

Research demo — not a diagnosis.
"""

from covid_cls.ui import build_app, launch

# Training workers are spawned processes, which re-import this file as "__mp_main__": they must not
# build a second UI (that would cost each run a Gradio import and a few seconds).
demo = build_app() if __name__ != "__mp_main__" else None

if __name__ == "__main__":
    launch(demo)
