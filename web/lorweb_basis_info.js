// LoRWeB: after a run, Load LoRA Basis shows what it loaded (sizes, mixing settings and the file's own metadata).
// Metadata comes from files people share, so every value is set with textContent and can never become markup.
import { registerOutputPanel } from "./lorweb_panel.js";

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

function createInfo() {
  const element = document.createElement("div");
  element.className = "lorweb-basis-info";
  Object.assign(element.style, { whiteSpace: "pre-wrap", font: "11px sans-serif", color: "#ddd", padding: "4px",
                                 overflowWrap: "anywhere", overflow: "hidden", height: "100%",
                                 boxSizing: "border-box" });
  return element;
}

registerOutputPanel({
  name: "lorweb.basisInfo", nodes: ["LoRWeB_LoadBasis"], output: "lorweb_basis",
  accepts: (info) => typeof info.file === "string",
  create: createInfo, fill: (element, info) => { element.textContent = lines(info).join("\n"); },
  property: "lorwebBasisInfo", widget: "lorweb_basis_info", display: "block", minHeight: 90, minSize: [340, 190],
});
