"""Drive ComfyUI's real front end in headless Chromium (Chrome DevTools Protocol over aiohttp).

    python browser_check.py SERVER_URL REPO_DIR ARTIFACT_DIR [--generate-examples] [--run-report]

Prints one JSON line of findings; tests/test_comfy_frontend.py asserts on them. Screenshots go to
ARTIFACT_DIR. ``--generate-examples`` builds the example workflows in the browser (so they are in
the front end's own UI format) and writes them to REPO_DIR/example_workflows.
Runs in the ComfyUI venv (aiohttp is a ComfyUI requirement).
"""

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

EXAMPLE_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"  # what the shipped examples name
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,1000",
    "--hide-scrollbars",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    raise SystemExit("chromium not found (apt-get install -y chromium)")


class CDP:
    def __init__(self, ws):
        self.ws = ws
        self.n = 0
        self.pending = {}
        self.events = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def send(self, method, **params):
        self.n += 1
        fut = asyncio.get_event_loop().create_future()
        self.pending[self.n] = fut
        await self.ws.send_str(json.dumps({"id": self.n, "method": method, "params": params}))
        res = await asyncio.wait_for(fut, 120)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res.get("result", {})

    async def js(self, expr, timeout=60):
        r = await self.send(
            "Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True, timeout=timeout * 1000
        )
        if r.get("exceptionDetails"):
            raise RuntimeError(f"JS error: {json.dumps(r['exceptionDetails'])[:2000]}")
        return r.get("result", {}).get("value")

    async def wait_js(self, expr, timeout=120, every=0.5):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                v = await self.js(expr)
                if v:
                    return v
            except RuntimeError:
                pass
            await asyncio.sleep(every)
        raise TimeoutError(f"timed out waiting for: {expr}")

    async def shot(self, path):
        r = await self.send("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(r["data"]))


FIT_JS = r"""
(() => {
  const nodes = app.graph._nodes || app.graph.nodes;
  if (!nodes.length) return false;
  let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
  for (const n of nodes) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }
  const r = app.canvasEl.getBoundingClientRect();
  const s = Math.min(1.0, 0.92 * Math.min(r.width / (x1 - x0), (r.height - 80) / (y1 - y0)));
  app.canvas.ds.scale = s;
  app.canvas.ds.offset = [-x0 + 90 / s, -y0 + 90 / s];
  app.canvas.setDirty(true, true);
  return true;
})()
"""

EXAMPLES_JS = r"""
(async () => {
  const LG = window.LiteGraph;
  const mk = (type, x, y) => { const n = LG.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
  const link = (a, ai, b, bname) => { const bi = b.inputs.findIndex(i => i.name === bname); a.connect(ai, b, bi); };
  const setw = (n, name, v) => { const w = n.widgets.find(w => w.name === name); if (w) w.value = v; };
  const ckptName = CKPT;
  const out = {};
  const fresh = () => { app.graph.clear(); };
  const txt2img = (model, mi, clip, ci, vae, x, y, prompt, prefix) => {
    const pos = mk("CLIPTextEncode", x, y); link(clip, ci, pos, "clip"); setw(pos, "text", prompt);
    const neg = mk("CLIPTextEncode", x, y + 280); link(clip, ci, neg, "clip"); setw(neg, "text", "");
    const lat = mk("EmptyLatentImage", x, y + 560); setw(lat, "width", 512); setw(lat, "height", 512);
    const ks = mk("KSampler", x + 460, y); link(model, mi, ks, "model"); link(pos, 0, ks, "positive");
    link(neg, 0, ks, "negative"); link(lat, 0, ks, "latent_image"); setw(ks, "steps", 20);
    const dec = mk("VAEDecode", x + 820, y); link(ks, 0, dec, "samples"); link(vae, 2, dec, "vae");
    const save = mk("SaveImage", x + 1060, y); link(dec, 0, save, "images"); setw(save, "filename_prefix", prefix);
  };
  // 1. Erase Concepts -> sample -> save the edit as a LoRA; report picture previewed
  fresh();
  let ck = mk("CheckpointLoaderSimple", 0, 0); setw(ck, "ckpt_name", ckptName);
  let er = mk("WeightsmithEraseConcepts", 380, 0); link(ck, 0, er, "model"); link(ck, 1, er, "clip");
  setw(er, "targets", "Van Gogh"); setw(er, "anchors", "art");
  let sv = mk("WeightsmithSaveEditAsLora", 380, 760); link(er, 2, sv, "edit"); setw(sv, "filename_prefix", "weightsmith/no-van-gogh");
  let pv = mk("PreviewImage", 380, 920); link(er, 4, pv, "images");
  txt2img(er, 0, er, 1, ck, 860, 0, "a painting of a village at night by Van Gogh", "weightsmith/erased");
  out["erase_concepts"] = app.graph.serialize();
  // 2. LoRA Stack x2 -> IterIS Merge -> sample -> save
  fresh();
  ck = mk("CheckpointLoaderSimple", 0, 0); setw(ck, "ckpt_name", ckptName);
  const s1 = mk("WeightsmithLoraStack", 0, 180); setw(s1, "sample_prompts", "a photo of a cat\na cat on a sofa");
  const s2 = mk("WeightsmithLoraStack", 0, 520); link(s1, 0, s2, "stack"); setw(s2, "sample_prompts", "a watercolor landscape");
  const mg = mk("WeightsmithIterISMerge", 380, 0); link(ck, 0, mg, "model"); link(ck, 1, mg, "clip"); link(s2, 0, mg, "stack");
  sv = mk("WeightsmithSaveEditAsLora", 380, 520); link(mg, 2, sv, "edit"); setw(sv, "filename_prefix", "weightsmith/merged");
  pv = mk("PreviewImage", 380, 680); link(mg, 4, pv, "images");
  txt2img(mg, 0, mg, 1, ck, 860, 0, "a watercolor painting of a cat", "weightsmith/merged");
  out["iteris_merge"] = app.graph.serialize();
  // 3. the saved LoRA in ComfyUI's own Load LoRA
  fresh();
  ck = mk("CheckpointLoaderSimple", 0, 0); setw(ck, "ckpt_name", ckptName);
  const lo = mk("LoraLoader", 380, 0); link(ck, 0, lo, "model"); link(ck, 1, lo, "clip");
  txt2img(lo, 0, lo, 1, ck, 800, 0, "a painting of a village at night by Van Gogh", "weightsmith/from-lora");
  out["load_saved_lora"] = app.graph.serialize();
  return out;
})()
"""


FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no getting-started template on first start
    "Comfy.Workflow.ShowMissingModelsWarning": False,  # the test checkpoint is all there is
    "Comfy.Workflow.ShowMissingNodesWarning": True,  # this one we want to see
    "Comfy.VueNodes.Enabled": False,  # the canvas nodes the checks read (newer front
}  # ends make Vue "Nodes 2.0" the default)


def prepare_settings(url: str) -> None:
    req = urllib.request.Request(
        url + "/api/settings",
        data=json.dumps(FRONTEND_SETTINGS).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=30).read()


async def close_dialogs(cdp):
    await cdp.js(
        "document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()); "
        "[...document.querySelectorAll('button')].filter(b => /close/i.test(b.getAttribute('aria-label') || ''))"
        ".forEach(b => b.click()); true"
    )


async def main(url, repo, art, generate, run_report):
    art = Path(art)
    art.mkdir(parents=True, exist_ok=True)
    found = {}
    prepare_settings(url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prof = tempfile.mkdtemp(prefix="ws-chromium-")
    proc = subprocess.Popen(
        [find_chromium(), *CHROME_FLAGS, f"--user-data-dir={prof}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.time() - t0 > 60:
                raise SystemExit("chromium did not start")
            await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as sess:
            async with sess.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = CDP(ws)
                await cdp.send("Page.enable")
                await cdp.send("Runtime.enable")
                await cdp.send("Page.navigate", url=url)
                await cdp.wait_js(
                    "!!(window.app && window.app.graph && window.LiteGraph && "
                    "window.LiteGraph.registered_node_types['KSampler'])",
                    timeout=180,
                )
                await asyncio.sleep(2)
                await close_dialogs(cdp)  # first-run dialogs and banners, if any
                found["registered"] = await cdp.js(
                    "Object.keys(LiteGraph.registered_node_types).filter(k => k.startsWith('Weightsmith'))"
                )
                found["extension_loaded"] = await cdp.js(
                    "(app.extensions || app.extensionManager?.extensions || []).some(e => e.name === 'weightsmith.report')"
                    " || !!document.querySelector('script[src*=\"weightsmith\"]')"
                    " || performance.getEntriesByType('resource').some(r => r.name.includes('/extensions/weightsmith'))"
                )
                ckpt = await cdp.js(
                    "(async () => (await (await fetch('/object_info/CheckpointLoaderSimple')).json())"
                    ".CheckpointLoaderSimple.input.required.ckpt_name[0][0])()"
                )
                if generate:
                    wfs = await cdp.js(EXAMPLES_JS.replace("CKPT", json.dumps(EXAMPLE_CKPT)))
                    d = Path(repo) / "example_workflows"
                    d.mkdir(exist_ok=True)
                    for name, wf in wfs.items():
                        (d / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
                    found["generated"] = sorted(wfs)
                # node search: double-click the empty canvas, type, read the results list
                await close_dialogs(cdp)
                await cdp.js("app.graph.clear(); app.canvas.setDirty(true, true); true")
                box = await cdp.js(
                    "(() => { const r = app.canvasEl.getBoundingClientRect(); "
                    "return [r.left + r.width / 2, r.top + r.height / 2]; })()"
                )
                for t in ("mousePressed", "mouseReleased"):
                    await cdp.send("Input.dispatchMouseEvent", type=t, x=box[0], y=box[1], button="left", clickCount=1)
                for t in ("mousePressed", "mouseReleased"):
                    await cdp.send("Input.dispatchMouseEvent", type=t, x=box[0], y=box[1], button="left", clickCount=2)
                await asyncio.sleep(1.5)
                await cdp.send("Input.insertText", text="Erase Concepts")
                await asyncio.sleep(2.0)
                found["search_text"] = await cdp.js(
                    "(() => { const el = document.querySelector('.comfy-vue-node-search-container')?.closest('.p-dialog')"
                    " || document.querySelector('.litesearchbox') || document.body; return el.innerText; })()"
                )
                await cdp.shot(art / "node_search.png")
                await cdp.send(
                    "Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27
                )
                await asyncio.sleep(0.5)
                # every example workflow loads with no missing nodes
                found["examples"] = {}
                for f in sorted((Path(repo) / "example_workflows").glob("*.json")):
                    wf = json.loads(f.read_text())
                    res = await cdp.js(
                        f"(async () => {{ await app.loadGraphData({json.dumps(wf)}); await new Promise(r => setTimeout(r, 500));"
                        " const nodes = app.graph._nodes || app.graph.nodes;"
                        " const types = nodes.map(n => n.type);"
                        " const missing = types.filter(t => !LiteGraph.registered_node_types[t]);"
                        " const dialog = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText)"
                        "   .filter(t => /missing/i.test(t));"
                        " return {types, missing, dialog}; })()"
                    )
                    found["examples"][f.name] = res
                    await cdp.js(FIT_JS)
                    await asyncio.sleep(0.8)
                    await cdp.shot(art / f"workflow_{f.stem}.png")
                    await cdp.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()); true")
                if run_report:
                    # run the erase example with fast settings; the report must appear on the node
                    wf = json.loads((Path(repo) / "example_workflows" / "erase_concepts.json").read_text())
                    res = await cdp.js(
                        f"(async () => {{ await app.loadGraphData({json.dumps(wf)});"
                        " const nodes = app.graph._nodes || app.graph.nodes;"
                        " const er = nodes.find(n => n.type === 'WeightsmithEraseConcepts');"
                        f" nodes.find(n => n.type === 'CheckpointLoaderSimple').widgets[0].value = {json.dumps(ckpt)};"
                        " er.widgets.find(w => w.name === 'prompt_expansion').value = 'off';"
                        # ComfyUI re-uses cached outputs without re-sending their ui: make this run new
                        " er.widgets.find(w => w.name === 'strength').value = 1 - (Date.now() % 89) / 1000;"
                        " const sv = nodes.find(n => n.type === 'WeightsmithSaveEditAsLora');"
                        " sv.widgets.find(w => w.name === 'filename_prefix').value = 'ws_browser/run' + Date.now();"
                        " for (const n of nodes) { if (n.type === 'EmptyLatentImage') { n.widgets.find(w => w.name === 'width').value = 64;"
                        "   n.widgets.find(w => w.name === 'height').value = 64; }"
                        "   if (n.type === 'KSampler') { n.widgets.find(w => w.name === 'steps').value = 1;"
                        "     n.widgets.find(w => w.name === 'seed').value = Date.now() % 1000000; } }"
                        " await app.queuePrompt(0); return er.id; })()"
                    )
                    found["report_node"] = res
                    text = await cdp.wait_js(
                        f"(() => {{ const n = app.graph.getNodeById({res});"
                        " const w = n.widgets?.find(w => w.name === 'weightsmith_report'); return w && w.value; })()",
                        timeout=900,
                        every=2,
                    )
                    found["report_text"] = text
                    found["save_report_text"] = await cdp.wait_js(
                        "(() => { const nodes = app.graph._nodes || app.graph.nodes;"
                        " const n = nodes.find(n => n.type === 'WeightsmithSaveEditAsLora');"
                        " const w = n.widgets?.find(w => w.name === 'weightsmith_report'); return w && w.value; })()",
                        timeout=300,
                        every=1,
                    )
                    t_q = time.time()  # let the rest of the graph finish before the screenshot
                    while (
                        await cdp.js(
                            "(async () => { const q = await (await fetch('/queue')).json();"
                            " return q.queue_running.length + q.queue_pending.length; })()"
                        )
                    ) and time.time() - t_q < 300:
                        await asyncio.sleep(1.0)
                    await asyncio.sleep(1.0)
                    found["report_dom"] = await cdp.js(
                        "[...document.querySelectorAll('textarea.weightsmith-report')].map(t => t.value.slice(0, 200))"
                    )
                    await cdp.js(
                        f"(() => {{ const n = app.graph.getNodeById({res}); app.canvas.ds.scale = 1.0;"
                        " const r = app.canvasEl.getBoundingClientRect();"
                        " app.canvas.ds.offset = [-n.pos[0] + 130, Math.min(-n.pos[1] + 150, r.height - 20 - n.pos[1] - n.size[1])];"
                        " app.canvas.setDirty(true, true);"
                        " return true; })()"
                    )
                    await asyncio.sleep(1.0)
                    await cdp.shot(art / "report_on_node.png")
                cdp.reader.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(prof, ignore_errors=True)
    return found


if __name__ == "__main__":
    a = sys.argv[1:]
    flags = {x for x in a if x.startswith("--")}
    pos = [x for x in a if not x.startswith("--")]
    print(
        json.dumps(asyncio.run(main(pos[0], pos[1], pos[2], "--generate-examples" in flags, "--run-report" in flags)))
    )
