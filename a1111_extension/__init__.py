"""The Weightsmith tab for AUTOMATIC1111 and Forge (entry: ``scripts/weightsmith_tab.py``).

- :mod:`.ui`: ``build_ui(backend)``, the Gradio layout (gradio 3.41 and 4.x).
- :mod:`.backend`: the host-independent ``Workbench`` (compute, apply, undo, save) and the
  ``StandaloneBackend``; :mod:`.live_weights`: reversible in-place edits next to the Lora extension.
- :mod:`.a1111`: the A1111 v1.10 backend; :mod:`.forge`: Forge (save-only); :mod:`.host` picks one.
- :mod:`.standalone`: serve the tab without a web UI.

Nothing here imports gradio or A1111's ``modules`` at import time.
"""
