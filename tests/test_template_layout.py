"""The templates open readable: every node inside its group, none on another, also at the sizes nodes take in use,
and the view the front end opens them at shows node text in a 1600x857 window. The model of that view,
``template_view``, is checked against the real front ends by tests/host/test_workflows_in_browser.py."""

from __future__ import annotations

import pytest
from template_view import (
    IN_USE_SIZE,
    READABLE_SCALE,
    READABLE_SCALE_ANY,
    WINDOW,
    contains,
    fitted_scale,
    layout_problems,
    nodes_bounds,
    restored_view,
)
from workflow_testing import WORKFLOWS, load_example


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_node_lies_inside_its_group_and_on_no_other_node(name):
    problems = layout_problems(load_example(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_node_is_saved_as_large_as_it_grows_in_use(name):
    small = [
        f"node {node['id']} {node['type']} is {node['size']}, at least {IN_USE_SIZE[node['type']]} in use"
        for node in load_example(name)["nodes"]
        if node["type"] in IN_USE_SIZE
        and any(saved < least for saved, least in zip(node["size"], IN_USE_SIZE[node["type"]], strict=True))
    ]
    assert not small, small


@pytest.mark.parametrize("name", WORKFLOWS)
def test_current_front_ends_open_the_template_readable(name):
    """Front ends 1.48 and newer fit the view to the nodes when the template browser opens a template."""
    scale = fitted_scale(load_example(name))
    assert scale >= READABLE_SCALE, f"{name} opens at {scale:.0%} in a {WINDOW[0]}x{WINDOW[1]} window: low detail"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_older_front_ends_open_the_template_whole_and_readable(name):
    """Front ends 1.35 and older restore the file's saved view (``extra.ds``); 1.27 has the smallest canvas."""
    workflow = load_example(name)
    scale, visible = restored_view(workflow)
    assert scale >= READABLE_SCALE_ANY, f"{name} saves the view at {scale:.0%}: low detail"
    assert contains(visible, nodes_bounds(workflow)), (name, visible, nodes_bounds(workflow))
