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

function showInfo(node, info) {
  if (!node.lorwebBasisInfo) {
    const element = document.createElement("div");
    element.className = "lorweb-basis-info";
    Object.assign(element.style, { whiteSpace: "pre-wrap", font: "11px sans-serif", color: "#ddd", padding: "4px",
                                   overflowWrap: "anywhere", overflow: "hidden" });
    node.lorwebBasisInfo = element;
    node.addDOMWidget("lorweb_basis_info", "lorweb_basis_info", element,
                      { serialize: false, hideOnZoom: false, getMinHeight: () => 90 });
    node.setSize([Math.max(node.size[0], 340), Math.max(node.size[1], 190)]);
  }
  node.lorwebBasisInfo.textContent = lines(info).join("\n");
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "lorweb.basisInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoRWeB_LoadBasis") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const info = output?.lorweb_basis?.[0];
      if (info && typeof info.file === "string") showInfo(this, info);
    };
  },
});
