import os
import tempfile

script_path = os.environ.get("WS_FAKE_WEBUI_ROOT") or tempfile.mkdtemp(prefix="fake-webui-")
models_path = os.path.join(script_path, "models")
