"""Progress of the headless runner: the executor's messages as tqdm bars (nodes of the graph, sampler steps)."""

from __future__ import annotations

from comfy_harness import HeadlessServer


class ProgressServer(HeadlessServer):
    """The headless PromptServer stand-in, showing one bar per prompt (nodes) and one per sampling (steps)."""

    client_id = "lorweb-runner"

    def __init__(self, label_prefix: str = ""):
        super().__init__()
        self.label_prefix = label_prefix  # e.g. "[rank 1/2] " when several processes share the terminal
        self.prompt: dict = {}
        self.nodes_bar = None
        self.steps_bar = None

    def start(self, prompt: dict, label: str) -> None:
        from tqdm import tqdm

        self.prompt = prompt
        self.nodes_bar = tqdm(total=len(prompt), desc=self.label_prefix + label, unit="node", dynamic_ncols=True)

    def finish(self) -> None:
        self._close_steps()
        if self.nodes_bar is not None:
            self.nodes_bar.update(self.nodes_bar.total - self.nodes_bar.n)
            self.nodes_bar.close()
            self.nodes_bar = None

    def send_sync(self, event, data, sid=None) -> None:
        if self.nodes_bar is None or not isinstance(data, dict):
            return
        if event == "execution_cached":
            self.nodes_bar.update(len(data.get("nodes") or []))
        elif event == "executing" and data.get("node") is not None:
            self._close_steps()
            self.nodes_bar.update(1)
            self.nodes_bar.set_postfix_str(self.prompt.get(data["node"], {}).get("class_type", str(data["node"])))

    def step(self, value, total, preview_image=None, prompt_id=None, node_id=None) -> None:
        from tqdm import tqdm

        if self.steps_bar is None or self.steps_bar.total != total:
            self._close_steps()
            self.steps_bar = tqdm(total=total, desc="  steps", unit="step", leave=False, dynamic_ncols=True)
        self.steps_bar.update(value - self.steps_bar.n)

    def _close_steps(self) -> None:
        if self.steps_bar is not None:
            self.steps_bar.close()
            self.steps_bar = None
