// LoRWeB: after a run, the Apply nodes show a compact picture of the mix they applied:
// a heat map (Flux blocks x basis LoRAs), the dominant basis LoRAs and the entropy of the mix.
// The data comes from the node's UI output "lorweb_mix" (see lorweb_ops/chart.py mix_summary).
// Text is only ever set with textContent, never as HTML: values may come from files users share.
import { registerOutputPanel } from "./lorweb_panel.js";

const VIRIDIS = [[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132], [122, 209, 81], [253, 231, 37]];

function viridis(value) {
  const position = Math.min(Math.max(value, 0), 1) * (VIRIDIS.length - 1);
  const low = Math.min(Math.floor(position), VIRIDIS.length - 2);
  const fraction = position - low;
  const mix = VIRIDIS[low].map((c, i) => Math.round(c * (1 - fraction) + VIRIDIS[low + 1][i] * fraction));
  return `rgb(${mix[0]}, ${mix[1]}, ${mix[2]})`;
}

function createPanel() {
  const panel = document.createElement("div");
  panel.className = "lorweb-mix";
  Object.assign(panel.style, { display: "flex", flexDirection: "column", gap: "4px", padding: "4px",
                               font: "11px sans-serif", color: "#ddd", overflow: "hidden", height: "100%",
                               boxSizing: "border-box" });
  const canvas = document.createElement("canvas");
  canvas.className = "lorweb-mix-heat";
  Object.assign(canvas.style, { width: "100%", height: "84px", flex: "0 0 auto", imageRendering: "pixelated" });
  const caption = document.createElement("div");
  caption.className = "lorweb-mix-caption";
  Object.assign(caption.style, { lineHeight: "1.3", whiteSpace: "normal", overflowWrap: "anywhere" });
  panel.append(canvas, caption);
  return panel;
}

function drawHeat(canvas, mix) {
  // columns = Flux blocks (model order), rows = basis LoRAs: wide and short fits a node
  const blocks = mix.heat.length;
  const loras = mix.num_loras;
  canvas.width = blocks;
  canvas.height = loras;
  const context = canvas.getContext("2d");
  mix.heat.forEach((row, block) => {
    row.forEach((value, lora) => {
      context.fillStyle = viridis(value / 255);
      context.fillRect(block, lora, 1, 1);
    });
  });
}

function describe(mix) {
  const dominant = mix.dominant.map(([index, value]) => `#${index} ${Number(value).toFixed(3)}`).join(", ");
  const percent = Math.round(100 * mix.entropy_fraction);
  return `${mix.layers} layers × ${mix.num_loras} LoRAs · entropy ${Number(mix.entropy).toFixed(2)} nats ` +
         `(${percent}% of uniform) · dominant ${dominant}`;
}

function fillMix(panel, mix) {
  drawHeat(panel.querySelector("canvas"), mix);
  const caption = panel.querySelector(".lorweb-mix-caption");
  caption.textContent = describe(mix);
  panel.title = caption.textContent;
}

registerOutputPanel({
  name: "lorweb.mixChart", nodes: ["LoRWeB_ApplyBasis", "LoRWeB_ApplyWeights"], output: "lorweb_mix",
  accepts: (mix) => Array.isArray(mix.heat),
  create: createPanel, fill: fillMix,
  property: "lorwebMixPanel", widget: "lorweb_mix", display: "flex", minHeight: 150, minSize: [340, 280],
});
