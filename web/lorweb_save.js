// LoRWeB: after a run, Save Composed LoRA shows what it wrote: the file name (as LoRA loaders list it), the rank,
// and how much of each layer a reduced rank kept (min / mean energy). Data: the node's UI output "lorweb_saved".
// Text is only ever set with textContent, never as HTML.
import { app } from "../../scripts/app.js";

function describe(info) {
  const kept = info.exact
    ? "exact"
    : `energy kept: min ${(100 * info.energy_min).toFixed(2)}%, mean ${(100 * info.energy_mean).toFixed(2)}%` +
      ` (${info.dtype})`;
  return `${info.lora_name}\n${info.layers} layers · rank ${info.rank} of ${info.full_rank} · ${kept}`;
}

function showSaved(node, info) {
  if (!node.lorwebSavedText) {
    const element = document.createElement("div");
    Object.assign(element.style, { whiteSpace: "pre-wrap", font: "11px sans-serif", color: "#ddd", padding: "4px",
                                   overflowWrap: "anywhere" });
    node.lorwebSavedText = element;
    node.addDOMWidget("lorweb_saved", "lorweb_saved", element, { serialize: false, hideOnZoom: false });
    node.setSize([Math.max(node.size[0], 300), Math.max(node.size[1], 140)]);
  }
  node.lorwebSavedText.textContent = describe(info);
  node.lorwebSavedText.title = node.lorwebSavedText.textContent;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "lorweb.savedLora",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoRWeB_SaveComposedLoRA") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const info = output?.lorweb_saved?.[0];
      if (info && typeof info.lora_name === "string") showSaved(this, info);
    };
  },
});
