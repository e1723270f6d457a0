"""The templates open readable: every node inside its group, none on another, and the view the front end opens
them at shows node text in a 1600x857 window (the model of that view, ``template_view``, is checked against the
real front ends by tests/host/test_workflows_in_browser.py)."""

from __future__ import annotations

import pytest
from template_view import (
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


#: Templates whose nodes cannot fit the readable area yet: the two-analogies template holds 32 nodes (five images, two
#: analogies, the compose group, four notes) in about 2.4 M square units, more than the 2080 x 1105 a readable fit has
#: even packed without gaps. It opens at 49 % (was 32 %) until its content is split or shortened (issue 15).
NOT_YET_READABLE = {"lorweb_compose_two_analogies_cmlora"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason="too many nodes for a readable fit (issue 15)"))
        if name in NOT_YET_READABLE
        else name
        for name in WORKFLOWS
    ],
)
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
