// LoRWeB: the one way the pack's nodes show what a run produced, in a DOM widget under the node (the basis info,
// the mix chart, the saved LoRA). Used by lorweb_basis_info.js, lorweb_mix.js and lorweb_save.js; it registers
// nothing itself.
import { app } from "../../scripts/app.js";

// Vue nodes ("Nodes 2.0") of front end 1.35 list a node's widgets when the node is added and never show one added
// later, so there the widget is made with the node. On the LiteGraph canvas it is made at the first run, as a
// widget made with the node would grow nodes whose saved size leaves no room (a workflow would change on load).
function vueNodesOn() {
  return Boolean(app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled"));
}

// The panel is hidden and 0 px high until the first run. The front end may set the widget element's own display,
// so the panel sits in a plain wrapper. widget.serialize = false keeps it out of the workflow's widgets_values,
// options.serialize out of the prompt.
function addPanel(node, spec) {
  const panel = spec.create();
  panel.style.display = "none";
  node[spec.property] = panel;
  const wrapper = document.createElement("div");
  wrapper.append(panel);
  const widget = node.addDOMWidget(spec.widget, spec.widget, wrapper, {
    serialize: false, hideOnZoom: false, getMinHeight: () => (panel.style.display === "none" ? 0 : spec.minHeight),
  });
  widget.serialize = false;
  return panel;
}

function showPanel(node, spec, data) {
  const panel = node[spec.property] ?? addPanel(node, spec);
  if (panel.style.display === "none") {
    panel.style.display = spec.display;
    node.setSize([Math.max(node.size[0], spec.minSize[0]), Math.max(node.size[1], spec.minSize[1])]);
  }
  spec.fill(panel, data);
  node.setDirtyCanvas?.(true, true);
}

// spec: name (the extension), nodes (node ids), output (the UI output key), accepts(data), create() -> element,
// fill(element, data), property (where the node keeps it), widget (its name), display, minHeight, minSize.
// Text is only ever set with textContent by the fill functions, never as HTML: values may come from shared files.
export function registerOutputPanel(spec) {
  app.registerExtension({
    name: spec.name,
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (!spec.nodes.includes(nodeData.name)) return;
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        if (vueNodesOn()) addPanel(this, spec);
        return result;
      };
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const data = output?.[spec.output]?.[0];
        if (data && spec.accepts(data)) showPanel(this, spec, data);
      };
    },
  });
}
