"""Shared by the pure and host tests of the example workflows: where they are, what they name, the converter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

WORKFLOWS_DIR = ROOT / "example_workflows"
FORWARD, REVERSE = "lorweb_analogy_flux_kontext", "lorweb_reverse_analogy_flux_kontext"
#: the composition examples (docs/compose.md): two analogies with cmlora; an analogy plus an ordinary LoRA
COMPOSE_TWO, COMPOSE_LORA = "lorweb_compose_two_analogies_cmlora", "lorweb_compose_analogy_and_lora"
#: the forward template's graph as one subgraph node (the blueprint of subgraphs/), for ComfyUI 0.8.0 and later
ONE_NODE = "lorweb_one_node_analogy"
BLUEPRINTS_DIR = ROOT / "subgraphs"
BLUEPRINT = BLUEPRINTS_DIR / "LoRWeB Analogy (Flux Kontext).json"
WORKFLOWS = sorted(path.stem for path in WORKFLOWS_DIR.glob("*.json"))
#: every model file the workflows name, and its ComfyUI model folder
MODEL_FILES = {
    "lorweb_model.safetensors": "lorweb",
    "clip-vit-large-patch14.safetensors": "clip_vision",
    "flux1-dev-kontext_fp8_scaled.safetensors": "diffusion_models",
    "clip_l.safetensors": "text_encoders",
    "t5xxl_fp8_e4m3fn_scaled.safetensors": "text_encoders",
    "ae.safetensors": "vae",
}
#: the pack's own example images (example_inputs/, drawn by scripts/example_inputs.py) the templates load
INPUT_IMAGES = (
    "lorweb_a.png",
    "lorweb_a_prime.png",
    "lorweb_b.png",
    "lorweb_b_sketch.png",
    "lorweb_a2.png",
    "lorweb_a2_prime.png",
)
#: placeholder names the compose examples pick in models/loras (the user's own LoRA)
LORA_FILES = ("your_style_lora.safetensors",)

# The converter the runner uses (scripts/ is not a package); re-exported for the tests.
from lorweb_workflow import (  # noqa: E402
    CONTROL_VALUES,
    FRONTEND_ONLY_TYPES,
    expand_subgraphs,
    input_specs,
    subgraph_definitions,
    ui_to_api,
    widget_slots,
)

__all__ = [
    "BLUEPRINT",
    "BLUEPRINTS_DIR",
    "COMPOSE_LORA",
    "COMPOSE_TWO",
    "CONTROL_VALUES",
    "FORWARD",
    "FRONTEND_ONLY_TYPES",
    "INPUT_IMAGES",
    "LORA_FILES",
    "MODEL_FILES",
    "ONE_NODE",
    "REVERSE",
    "WORKFLOWS",
    "WORKFLOWS_DIR",
    "all_nodes",
    "expand_subgraphs",
    "input_specs",
    "load_example",
    "subgraph_definitions",
    "ui_to_api",
    "widget_slots",
]


def load_example(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def all_nodes(workflow: dict) -> list[dict]:
    """The nodes of a workflow and of every subgraph it defines (the nodes the server runs, and the subgraph nodes)."""
    inner = [node for sg in subgraph_definitions(workflow).values() for node in sg.get("nodes") or []]
    return list(workflow["nodes"]) + inner
