// Weightsmith: show each node's report on the node itself after a run.
//
// Erase Concepts, IterIS Merge and Save Edit as LoRA send their report in the "ui" part of their
// result (key "weightsmith_report"). This extension puts it in a read-only text box on the node,
// so the per-layer numbers (|dW|/|W|, residuals) and the saved LoRA's name are visible without
// wiring a text display node. The box is not saved with the workflow.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "weightsmith_report";

function showReport(node, text) {
  let w = node.widgets?.find((x) => x.name === WIDGET);
  if (!w) {
    w = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    w.serialize = false;
    // a taller box than the input text boxes (DOM widget size hints of the front end)
    w.options = { ...(w.options || {}), serialize: false, getMinHeight: () => 220, getHeight: () => 260 };
    if (w.inputEl) {
      w.inputEl.readOnly = true;
      w.inputEl.classList.add("weightsmith-report");
      w.inputEl.style.fontFamily = "monospace";
      w.inputEl.style.fontSize = "11px";
      w.inputEl.style.opacity = "0.9";
    }
  }
  w.value = text;
  if (w.inputEl) w.inputEl.value = text;
  // make room for the report box (about twenty lines; it scrolls for the rest)
  const min = node.computeSize?.();
  if (min && node.size) node.setSize([Math.max(node.size[0], min[0], 440), Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "weightsmith.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("Weightsmith")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const text = message?.[WIDGET];
      if (text && text.length) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
      return r;
    };
  },
});
