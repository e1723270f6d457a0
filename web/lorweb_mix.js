// LoRWeB: after a run, the Apply nodes show a compact picture of the mix they applied:
// a heat map (Flux blocks x basis LoRAs), the dominant basis LoRAs and the entropy of the mix.
// The data comes from the node's UI output "lorweb_mix" (see lorweb_ops/chart.py mix_summary).
// Text is only ever set with textContent, never as HTML: values may come from files users share.
import { app } from "../../scripts/app.js";

const MIX_NODES = new Set(["LoRWeB_ApplyBasis", "LoRWeB_ApplyWeights"]);
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

// Hidden and 0 px high until the first run (see vueNodesOn). The front end may set the widget element's own
// display, so the panel sits in a plain wrapper.
function addPanel(node) {
  const panel = createPanel();
  panel.style.display = "none";
  node.lorwebMixPanel = panel;
  const wrapper = document.createElement("div");
  wrapper.append(panel);
  const widget = node.addDOMWidget("lorweb_mix", "lorweb_mix", wrapper, {
    serialize: false, hideOnZoom: false, getMinHeight: () => (panel.style.display === "none" ? 0 : 150),
  });
  // options.serialize keeps it out of the prompt; the workflow's widgets_values are LiteGraph's widget.serialize
  widget.serialize = false;
}

function showMix(node, mix) {
  if (!node.lorwebMixPanel) addPanel(node);
  if (node.lorwebMixPanel.style.display === "none") {
    node.lorwebMixPanel.style.display = "flex";
    node.setSize([Math.max(node.size[0], 340), Math.max(node.size[1], 280)]);
  }
  drawHeat(node.lorwebMixPanel.querySelector("canvas"), mix);
  const caption = node.lorwebMixPanel.querySelector(".lorweb-mix-caption");
  caption.textContent = describe(mix);
  node.lorwebMixPanel.title = caption.textContent;
  node.setDirtyCanvas?.(true, true);
}

// Vue nodes ("Nodes 2.0") of front end 1.35 list a node's widgets when the node is added and never show one added
// later, so there the widget is made with the node. On the LiteGraph canvas it is made at the first run, as a
// widget made with the node would grow nodes whose saved size leaves no room (a workflow would change on load).
function vueNodesOn() {
  return Boolean(app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled"));
}

app.registerExtension({
  name: "lorweb.mixChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!MIX_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (vueNodesOn()) addPanel(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const mix = output?.lorweb_mix?.[0];
      if (mix && Array.isArray(mix.heat)) showMix(this, mix);
    };
  },
});
