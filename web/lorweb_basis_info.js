// LoRWeB: after a run, Load LoRA Basis shows what it loaded (sizes, mixing settings and the file's own metadata).
// Metadata comes from files people share, so every value is set with textContent and can never become markup.
import { app } from "../../scripts/app.js";

function lines(info) {
  const settings = info.settings || {};
  const rows = [
    `${info.file}: ${info.modules} layers, K=${info.num_loras}, rank ${info.rank}, ${info.dtype}`,
    `query ${settings.query_mode} (${info.query_dim}), heads ${settings.lora_heads}, ` +
      `${settings.lora_softmax ? "softmax" : "tanh"}, ${settings.mixing_coeffs_type} — from ${info.settings_source}`,
    `encoder: ${settings.external_query_model}`,
  ];
  for (const [key, value] of Object.entries(info.metadata || {})) {
    if (["name", "software", "version", "ss_output_name"].includes(key)) rows.push(`${key}: ${value}`);
  }
  return rows;
}

// Hidden and 0 px high until the first run (see vueNodesOn); widget.serialize = false keeps it out of the
// workflow's widgets_values, options.serialize out of the prompt.
function addInfo(node) {
  const element = document.createElement("div");
  element.className = "lorweb-basis-info";
  Object.assign(element.style, { whiteSpace: "pre-wrap", font: "11px sans-serif", color: "#ddd", padding: "4px",
                                 overflowWrap: "anywhere", overflow: "hidden", display: "none", height: "100%",
                                 boxSizing: "border-box" });
  node.lorwebBasisInfo = element;
  const wrapper = document.createElement("div"); // the front end may set the widget element's own display
  wrapper.append(element);
  const widget = node.addDOMWidget("lorweb_basis_info", "lorweb_basis_info", wrapper, {
    serialize: false, hideOnZoom: false, getMinHeight: () => (element.style.display === "none" ? 0 : 90),
  });
  widget.serialize = false;
}

function showInfo(node, info) {
  if (!node.lorwebBasisInfo) addInfo(node);
  if (node.lorwebBasisInfo.style.display === "none") {
    node.lorwebBasisInfo.style.display = "block";
    node.setSize([Math.max(node.size[0], 340), Math.max(node.size[1], 190)]);
  }
  node.lorwebBasisInfo.textContent = lines(info).join("\n");
  node.setDirtyCanvas?.(true, true);
}

// Vue nodes ("Nodes 2.0") of front end 1.35 list a node's widgets when the node is added and never show one added
// later, so there the widget is made with the node. On the LiteGraph canvas it is made at the first run, as a
// widget made with the node would grow nodes whose saved size leaves no room (a workflow would change on load).
function vueNodesOn() {
  return Boolean(app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled"));
}

app.registerExtension({
  name: "lorweb.basisInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoRWeB_LoadBasis") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (vueNodesOn()) addInfo(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const info = output?.lorweb_basis?.[0];
      if (info && typeof info.file === "string") showInfo(this, info);
    };
  },
});
