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

// Hidden and 0 px high until the first run (see vueNodesOn); widget.serialize = false keeps it out of the
// workflow's widgets_values, options.serialize out of the prompt.
function addSaved(node) {
  const element = document.createElement("div");
  Object.assign(element.style, { whiteSpace: "pre-wrap", font: "11px sans-serif", color: "#ddd", padding: "4px",
                                 overflowWrap: "anywhere", display: "none", height: "100%",
                                 boxSizing: "border-box" });
  node.lorwebSavedText = element;
  const wrapper = document.createElement("div"); // the front end may set the widget element's own display
  wrapper.append(element);
  const widget = node.addDOMWidget("lorweb_saved", "lorweb_saved", wrapper, {
    serialize: false, hideOnZoom: false, getMinHeight: () => (element.style.display === "none" ? 0 : 40),
  });
  widget.serialize = false;
}

function showSaved(node, info) {
  if (!node.lorwebSavedText) addSaved(node);
  if (node.lorwebSavedText.style.display === "none") {
    node.lorwebSavedText.style.display = "block";
    node.setSize([Math.max(node.size[0], 300), Math.max(node.size[1], 140)]);
  }
  node.lorwebSavedText.textContent = describe(info);
  node.lorwebSavedText.title = node.lorwebSavedText.textContent;
  node.setDirtyCanvas?.(true, true);
}

// Vue nodes ("Nodes 2.0") of front end 1.35 list a node's widgets when the node is added and never show one added
// later, so there the widget is made with the node. On the LiteGraph canvas it is made at the first run, as a
// widget made with the node would grow nodes whose saved size leaves no room (a workflow would change on load).
function vueNodesOn() {
  return Boolean(app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled"));
}

app.registerExtension({
  name: "lorweb.savedLora",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoRWeB_SaveComposedLoRA") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (vueNodesOn()) addSaved(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const info = output?.lorweb_saved?.[0];
      if (info && typeof info.lora_name === "string") showSaved(this, info);
    };
  },
});
