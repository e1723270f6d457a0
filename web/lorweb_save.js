// LoRWeB: after a run, Save Composed LoRA shows what it wrote: the file name (as LoRA loaders list it), the rank,
// and how much of each layer a reduced rank kept (min / mean energy). Data: the node's UI output "lorweb_saved".
// Text is only ever set with textContent, never as HTML.
import { registerOutputPanel } from "./lorweb_panel.js";

function describe(info) {
  const kept = info.exact
    ? "exact"
    : `energy kept: min ${(100 * info.energy_min).toFixed(2)}%, mean ${(100 * info.energy_mean).toFixed(2)}%` +
      ` (${info.dtype})`;
  return `${info.lora_name}\n${info.layers} layers · rank ${info.rank} of ${info.full_rank} · ${kept}`;
}

function createSaved() {
  const element = document.createElement("div");
  Object.assign(element.style, { whiteSpace: "pre-wrap", font: "11px sans-serif", color: "#ddd", padding: "4px",
                                 overflowWrap: "anywhere", height: "100%", boxSizing: "border-box" });
  return element;
}

function fillSaved(element, info) {
  element.textContent = describe(info);
  element.title = element.textContent;
}

registerOutputPanel({
  name: "lorweb.savedLora", nodes: ["LoRWeB_SaveComposedLoRA"], output: "lorweb_saved",
  accepts: (info) => typeof info.lora_name === "string",
  create: createSaved, fill: fillSaved,
  property: "lorwebSavedText", widget: "lorweb_saved", display: "block", minHeight: 40, minSize: [300, 140],
});
