"""
The ``curl`` commands an operator's page gives, run as written against a real node (``harness.run_curl`` sends
what curl would, to the node's port).
"""

import os
import re

from .harness import REPO, check_verify_commands


def _block_after(path: str, heading: str) -> str:
    """
    The first fenced code block after ``heading`` in the page at ``path``.
    """
    with open(os.path.join(REPO, path), encoding="utf-8") as page:
        text = page.read()
    start = text.index(heading)
    match = re.search(r"```[a-z]*\n(.*?)```", text[start:], re.S)
    return match.group(1)


def test_deployments_verify_a_tenant_commands_do_what_the_page_says_against_a_real_node(log_dir):
    """
    DEPLOYMENT.md's "Verify a tenant": the health check answers, the PUT stores the key and the GET reads it
    back, the peers answer, and another tenant's prefix is 404.
    """
    commands = [line.rstrip("&").strip() for line in _block_after("docs/DEPLOYMENT.md", "## Verify a tenant")
                .splitlines() if line.startswith("curl ")]
    check_verify_commands(commands, "analytics", log_dir)
